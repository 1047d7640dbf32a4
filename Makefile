# eqat — top-level entry points. `make demo` and `make test` each do the complete set-up on a fresh Debian 12
# machine (apt packages, a venv with the pinned LibTorch wheel), configure, build, then run.
#
# Variables:
#   EQAT_TORCH_DIR  use your own LibTorch (a directory containing share/cmake/Torch or the libtorch root);
#                   skips the venv wheel.
#   BUILD           build directory (default: build)
#   CMAKE_ARGS      extra CMake arguments (e.g. -DEQAT_CUDA=OFF)
SHELL := /bin/bash
BUILD ?= build
JOBS ?= $(shell nproc)
VENV ?= $(CURDIR)/.venv

ifeq ($(strip $(EQAT_TORCH_DIR)),)
TORCH_PREFIX = $$($(VENV)/bin/python -c 'import torch.utils; print(torch.utils.cmake_prefix_path)' 2>/dev/null)
else
TORCH_PREFIX = $(EQAT_TORCH_DIR)
endif

.PHONY: all setup configure build test test-all demo clean fuzz

all: build

setup:
	@EQAT_TORCH_DIR="$(EQAT_TORCH_DIR)" EQAT_VENV="$(VENV)" scripts/setup.sh

configure: setup
	@if [[ ! -f $(BUILD)/build.ninja ]]; then \
	  cmake -G Ninja -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" $(CMAKE_ARGS) \
	    > $(BUILD).configure.log 2>&1 || { cat $(BUILD).configure.log; exit 1; }; \
	  grep -E "^-- eqat" $(BUILD).configure.log || true; \
	fi

build: configure
	cmake --build $(BUILD) -j $(JOBS)
	@echo "built $(BUILD)/bin/eqat"

# The CPU suite (tests labelled gpu skip themselves without a device and are excluded here).
test: build
	cd $(BUILD) && ctest -LE gpu --output-on-failure -j $(JOBS)

test-all: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

demo: build
	@scripts/demo.sh $(BUILD)/bin/eqat

fuzz: setup
	cmake -G Ninja -S . -B build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DCMAKE_C_COMPILER=clang \
	  -DCMAKE_CXX_COMPILER=clang++ -DEQAT_FUZZ=ON -DEQAT_BUILD_TESTS=OFF -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)"
	cmake --build build-fuzz -j $(JOBS) --target safetensors_header_fuzz config_fuzz

clean:
	rm -rf $(BUILD) $(BUILD).configure.log build-fuzz

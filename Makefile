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

.PHONY: all setup configure build test test-all demo clean fuzz sanitize

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
	  -DCMAKE_CXX_COMPILER=clang++ -DEQAT_FUZZ=ON -DEQAT_BUILD_TESTS=OFF -DEQAT_CUDA=OFF -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)"
	cmake --build build-fuzz -j $(JOBS) --target safetensors_header_fuzz config_fuzz tokenizer_fuzz image_fuzz eval_fuzz \
	  llama2c_fuzz

# The CPU suite under AddressSanitizer + UndefinedBehaviorSanitizer (GCC), in its own build dir (niced, so an
# interactive build next to it keeps priority).
# LibTorch, OpenCV and SentencePiece are prebuilt, not instrumented; the runtime options avoid their false positives:
#   detect_leaks=0           LibTorch/OpenMP keep static registries and thread pools alive at exit (LSan "leaks").
#   protect_shadow_gap=0     the CUDA-enabled torch wheel loads libcudart/libcuda, whose mappings land in the
#                            shadow gap ASan otherwise reserves (a startup abort even on CPU-only machines).
#   alloc_dealloc_mismatch=0 a prebuilt library's operator new/delete pairs are invisible to ASan; mismatches it
#                            reports across the boundary are not ours.
#   halt_on_error=1, print_stacktrace=1 (UBSan): a report fails the test, with a stack.
# -fno-sanitize=vptr: LibTorch's classes carry RTTI from an uninstrumented build; vptr checks on them misfire.
SANITIZE_FLAGS = -fsanitize=address,undefined -fno-sanitize=vptr -fno-omit-frame-pointer -g
SANITIZE_ENV = ASAN_OPTIONS=detect_leaks=0:protect_shadow_gap=0:alloc_dealloc_mismatch=0 \
               UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1
sanitize: setup
	@if [[ ! -f build-asan/build.ninja ]]; then \
	  mkdir -p build-asan; cmake -G Ninja -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEQAT_CUDA=OFF \
	    -DCMAKE_CXX_FLAGS="$(SANITIZE_FLAGS)" -DCMAKE_EXE_LINKER_FLAGS="$(SANITIZE_FLAGS)" \
	    -DCMAKE_PREFIX_PATH="$(TORCH_PREFIX)" > build-asan/configure.log 2>&1 || { cat build-asan/configure.log; exit 1; }; \
	fi
	nice -n 10 cmake --build build-asan -j $(JOBS)
	cd build-asan && $(SANITIZE_ENV) ctest -LE gpu --output-on-failure -j $(JOBS)

clean:
	rm -rf $(BUILD) $(BUILD).configure.log build-fuzz build-asan

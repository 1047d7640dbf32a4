#!/usr/bin/env bash
# Installs what eqat needs to build, on a fresh Debian 12 machine. Idempotent: a second run only checks.
#   - Debian packages (apt-get): compilers' friends and the C++ libraries eqat links.
#   - LibTorch: the PyPI torch wheel pinned to TORCH_VERSION, in a git-ignored venv (.venv), found by CMake
#     through torch.utils.cmake_prefix_path. Skipped when the user points EQAT_TORCH_DIR at their own LibTorch.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TORCH_VERSION="${TORCH_VERSION:-2.11.0}"
VENV="${EQAT_VENV:-$ROOT/.venv}"
PKGS=(build-essential cmake ninja-build ccache pkg-config python3-venv
      libopencv-dev libjpeg-dev libsentencepiece-dev nlohmann-json3-dev libstb-dev libgtest-dev
      libcpp-httplib-dev libpcre2-dev
      chromium)  # chromium: the headless browser of eqat serve's page test (skipped where it is absent)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing Debian packages: ${missing[*]}" >&2
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [[ -n "${EQAT_TORCH_DIR:-}" ]]; then
  echo "setup: using LibTorch at EQAT_TORCH_DIR=$EQAT_TORCH_DIR" >&2
  exit 0
fi
if [[ ! -x "$VENV/bin/python" ]]; then
  echo "setup: creating venv $VENV" >&2
  python3 -m venv "$VENV"
fi
have="$("$VENV/bin/python" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || true)"
if [[ "$have" != "$TORCH_VERSION" ]]; then
  # The CUDA wheel and its nvidia-* dependencies unpack to about 5 GB; pip's wheel cache would add their ~3 GB of
  # downloads a second time, so it is bypassed. Check the space first: a full disk otherwise surfaces as an OSError
  # halfway through the install.
  need_kb=$((6 * 1024 * 1024))
  free_kb="$(df -Pk "$VENV" | awk 'NR==2 {print $4}')"
  if [[ -n "$free_kb" && "$free_kb" -lt "$need_kb" ]]; then
    echo "setup: $VENV: installing torch==$TORCH_VERSION needs about 6 GB free, only $((free_kb / 1024)) MB left;" \
         "free some space or set EQAT_TORCH_DIR to an existing LibTorch" >&2
    exit 1
  fi
  echo "setup: installing torch==$TORCH_VERSION into $VENV (LibTorch for the C++ build; about 5 GB the first time)" >&2
  "$VENV/bin/pip" install -q --no-cache-dir --disable-pip-version-check "torch==$TORCH_VERSION"
fi
# The official openai client, for the test that talks to `eqat serve` with it (pure Python, a few MB).
OPENAI_VERSION="3.57.0"
have_openai="$("$VENV/bin/python" -c 'import openai; print(openai.__version__)' 2>/dev/null || true)"
if [[ "$have_openai" != "$OPENAI_VERSION" ]]; then
  echo "setup: installing openai==$OPENAI_VERSION into $VENV (the serve test's client)" >&2
  "$VENV/bin/pip" install -q --disable-pip-version-check "openai==$OPENAI_VERSION"
fi

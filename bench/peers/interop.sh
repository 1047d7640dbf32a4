#!/usr/bin/env bash
# Interop check of eqat's GPTQ exports against the Python peers (transformers+optimum, GPTQModel); see interop.py.
#   bench/peers/interop.sh [--eqat PATH] [--work DIR] [--only REGEX] [--out FILE.json] [--keep]
# EQAT=/path/to/eqat works too (default: build/bin/eqat). Writes bench/results/interop_cpu_<date>.json and prints
# the Markdown table on stdout; exits 1 when a comparison that ran is out of tolerance.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -x "$here/.venv/bin/python" ]] || bash "$here/setup.sh"
# eager TorchLinear (no inductor C++ builds on the shared CPU); one thread per process, one process at a time
export TORCH_COMPILE_DISABLE="${TORCH_COMPILE_DISABLE:-1}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec "$here/.venv/bin/python" "$here/interop.py" "$@"

#!/usr/bin/env bash
# The peers (AutoRound, GPTQModel) quantize eqat's models at eqat's settings; eqat scores them; see quantize_peers.py.
#   bench/peers/quantize_peers.sh [--only REGEX] [--peers LIST] [--eqat-methods LIST] [--seed S] [--samples N]
#                                [--work DIR] [--out FILE.json]
# EQAT=/path/to/eqat works too (default: build/bin/eqat). Writes bench/results/peers_cpu_<date>.json and prints the
# Markdown tables on stdout; work files go under /tmp/eqat-peers (--work).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
[[ -x "$here/.venv/bin/python" ]] || bash "$here/setup.sh"
# eager torch (no inductor C++ builds on the shared CPU); GPTQModel needs 2 CPU workers to load a model for
# quantization (its default on a 2-core machine is 1, and load() then refuses); the whole run at low priority
export TORCH_COMPILE_DISABLE="${TORCH_COMPILE_DISABLE:-1}" GPTQMODEL_CPU_WORKERS="${GPTQMODEL_CPU_WORKERS:-2}"
exec nice -n "${NICE:-10}" "$here/.venv/bin/python" "$here/quantize_peers.py" "$@"

#!/usr/bin/env bash
# Creates bench/peers/.venv (git-ignored) with the pinned peer tools of bench/peers/requirements.txt.
# Idempotent: an existing venv is kept and only brought in line with the pins (pip skips what is already there).
# CPU-only torch is enough for bench/peers/interop.py; PIP_INDEX_URL etc. are honoured as usual.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
py="${PYTHON:-python3}"

if [[ ! -x "$venv/bin/python" ]]; then
    "$py" -m venv "$venv"
    "$venv/bin/python" -m pip install --upgrade pip >/dev/null
fi
# Re-running with every pin satisfied is a no-op (pip prints "Requirement already satisfied").
"$venv/bin/python" -m pip install -q -r "$here/requirements.txt"
"$venv/bin/python" - <<'EOF'
from importlib.metadata import version
for name in ("gptqmodel", "transformers", "optimum", "auto-round", "torch", "sentencepiece"):
    print(f"{name}=={version(name)}")
EOF

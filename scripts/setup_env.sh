#!/usr/bin/env bash
# Create .venv (if missing) and install mft-trainer with its test dependencies into it.
# The pinned CPU torch goes first: a plain `torch` requirement on a machine without torch would
# pull a multi-GB CUDA build. On a GPU machine, install the torch build you want before this.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }
.venv/bin/python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e ".[dev]"
# DeepSpeed builds its ops against the installed torch; an isolated build would fetch another torch.
.venv/bin/python -c "import deepspeed" 2>/dev/null || pip install -q --no-build-isolation deepspeed

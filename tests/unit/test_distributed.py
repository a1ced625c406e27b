"""The distributed settings and helpers, in one process (the torchrun runs: tests/dist)."""

from __future__ import annotations

import pytest
import torch

from instructkit.losses import rl
from instructkit.config import DistributedConfig, Plan, PPOConfig, SFTConfig, accumulation, load_config, resolve_plan
from instructkit.engine import distributed as D
from instructkit.errors import ConfigError, UserError


@pytest.mark.parametrize("stage,strategy,reshard", [(0, "ddp", True), (2, "fsdp", False), (3, "fsdp", True)])
def test_zero_stages_map_onto_ddp_and_fsdp(stage, strategy, reshard):
    plan = resolve_plan(DistributedConfig(zero_stage=stage))
    assert (plan.strategy, plan.reshard_after_forward) == (strategy, reshard)


def test_default_is_fully_sharded_fsdp():
    assert resolve_plan(DistributedConfig()) == Plan("fsdp", True, False)


def test_zero_stage_1_is_rejected_with_the_reason():
    with pytest.raises(UserError, match="ZeRO-1.*zero_stage=2"):
        resolve_plan(DistributedConfig(zero_stage=1))


def test_contradictions_are_rejected():
    with pytest.raises(UserError, match="zero_stage=3 means strategy=fsdp"):
        resolve_plan(DistributedConfig(zero_stage=3, strategy="ddp"))
    with pytest.raises(UserError, match="cpu_offload needs strategy=fsdp"):
        resolve_plan(DistributedConfig(strategy="ddp", cpu_offload=True))


def test_config_files_check_the_section(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("data: {train: x.jsonl}\ntrain: {max_steps: 1}\ndistributed:\n  zero_stage: 1\n")
    with pytest.raises(ConfigError, match="ZeRO-1"):
        load_config(SFTConfig, path)
    path.write_text("data: {train: x.jsonl}\ntrain: {max_steps: 1}\ndistributed:\n  zero_stag: 3\n")
    with pytest.raises(ConfigError, match="zero_stage"):  # a typo names the valid keys
        load_config(SFTConfig, path)


def test_ppo_rejects_ddp_and_says_why():
    with pytest.raises(ConfigError, match="one forward per backward"):
        load_config(PPOConfig, None, ["data.train=x.jsonl", "reward.function=m:f", "train.max_steps=1",
                                      "distributed.strategy=ddp"])


def test_global_batch_size_counts_the_ranks_torchrun_announced(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = load_config(SFTConfig, None, ["data.train=x.jsonl", "train.max_steps=1", "train.micro_batch_size=2",
                                        "train.global_batch_size=8"])
    assert accumulation(cfg.train, 2) == 2  # 2 per micro-batch x 2 ranks x 2 accumulation
    with pytest.raises(ConfigError, match="micro_batch_size x world_size = 4 x 2"):  # fine in one process
        load_config(SFTConfig, None, ["data.train=x.jsonl", "train.max_steps=1", "train.micro_batch_size=4",
                                      "train.global_batch_size=4"])


def test_one_process_helpers_are_the_identity():
    assert not D.active() and D.world_size() == 1 and D.rank() == 0 and D.is_main()
    assert D.rank_slice([1, 2, 3]) == [1, 2, 3]
    assert D.global_sum(3) == 3.0
    t = torch.tensor([1.0, 2.0])
    assert D.gather_cat(t) is t
    model = torch.nn.Linear(2, 1)
    wrapped = D.wrap(model, DistributedConfig(), "fp32", torch.device("cpu"))
    assert isinstance(wrapped, D.Wrapped) and wrapped.module is model and not wrapped.sharded
    assert wrapped(lambda m, x: m(x) * 2, torch.ones(1, 2)).shape == (1, 1)
    with wrapped.grad_sync(False):  # nothing to hold back in one process
        pass
    with D.gathered(wrapped) as full:
        assert full is model
    assert D.wrapped(wrapped) is wrapped and D.wrapped(model).module is model


def test_whitening_with_a_sum_over_ranks_uses_the_global_statistics():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # Two ranks holding the same rows: the global mean and variance are the local ones.
    twice = rl.masked_whiten(values, mask, sum_over_ranks=lambda t: 2 * t)
    torch.testing.assert_close(twice, rl.masked_whiten(values, mask))
    # Another rank holding the same rows shifted by +10: by hand, the global mean of the
    # 10 entries {1..5, 11..15} is 8 and their variance 27, so this rank's 1 becomes -7/sqrt(27).
    local_sum = (values * mask).sum()
    def plus_shifted(t):
        if t.numel() == 2:  # [sum, count]
            return torch.stack([2 * local_sum + 10 * 5, torch.tensor(10.0)])
        dev_here = (((values - 8) ** 2) * mask).sum()
        dev_there = (((values + 10 - 8) ** 2) * mask).sum()
        return dev_here + dev_there
    out = rl.masked_whiten(values, mask, sum_over_ranks=plus_shifted)
    assert float(out[0, 0]) == pytest.approx(-7 / 27 ** 0.5, rel=1e-5)
    assert float(out[1, 2]) == 0.0  # masked out


def test_commands_that_are_not_training_stages_refuse_torchrun(monkeypatch, capsys):
    from instructkit.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["pipeline", "configs/tiny/pipeline.yaml"]) == 2
    err = capsys.readouterr().err
    assert "does not run under torchrun" in err and "one process" in err
    assert main(["merge", "runs/x/final", "out"]) == 2
    assert "does not run under torchrun" in capsys.readouterr().err

"""engine.run.TrainingRun: the bookkeeping fit and PPO share (schedule, guard, checkpoints, resume)."""

import json

import pytest
import torch

from instructkit.config import LogConfig, TrainConfig
from instructkit.engine import distributed as D
from instructkit.engine.run import TrainingRun, due

T = TrainConfig(lr=0.1, min_lr=0.0, schedule="cosine", warmup_steps=1, max_steps=6, keep_last=2,
                max_nonfinite_steps=3, seed=0)
LOG = LogConfig(tensorboard=False, progress=False)


def plan(epoch: int):
    return [[epoch, i] for i in range(4)]


def new_run(out, resume: bool) -> TrainingRun:
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD([{"params": list(model.parameters()), "base_lr": T.lr}], lr=T.lr)
    return TrainingRun("sft", out, D.Wrapped(model), optimizer, plan, T.max_steps, T, LOG, {"model": {}},
                       "fp32", "sdpa", resume)


def train(run: TrainingRun, until: int) -> list:
    """Steps of a toy loss; step 2 (counting from 1) has a non-finite loss and is skipped."""
    seen = []
    while run.step < until:
        run.set_lr()
        spec = run.stream.next()
        seen.append((spec, run.lr()))
        x = torch.tensor([[float(spec[0]), float(spec[1]), 1.0]])
        loss = (run.wrapped.module(x) ** 2).sum()
        loss.backward()
        run.optimizer_step(float("nan") if run.step == 1 else float(loss.detach()), T.max_grad_norm)
        run.step += 1
        run.loop["tokens_seen"] += 10
        run.log({"loss": float(loss.detach())})
        if due(run.step, 3):
            run.save()
    return seen


def test_a_resumed_run_continues_exactly_where_the_uninterrupted_one_went(tmp_path):
    whole = new_run(tmp_path / "whole", resume=False)
    seen_whole = train(whole, T.max_steps)
    whole.end()

    cut = new_run(tmp_path / "cut", resume=False)
    train(cut, 4)  # checkpoint at step 3, then one step more that the resume must redo
    cut.end()
    resumed = new_run(tmp_path / "cut", resume=True)
    assert resumed.step == 3
    assert resumed.loop["tokens_seen"] == 30 and resumed.guard.total == 1  # the skipped step is remembered
    seen_resumed = train(resumed, T.max_steps)
    resumed.end()

    assert seen_resumed == seen_whole[3:]  # same batches, same learning rates
    for a, b in zip(whole.wrapped.module.parameters(), resumed.wrapped.module.parameters()):
        assert torch.equal(a, b)
    records = [json.loads(line) for line in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]  # step 4 logged once


def test_the_schedule_multiplies_each_groups_base_rate(tmp_path):
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD([{"params": [model.weight], "lr": 0.1, "base_lr": 0.1},
                                 {"params": [model.bias], "lr": 0.02, "base_lr": 0.02}])
    run = TrainingRun("ppo", tmp_path, D.Wrapped(model), optimizer, plan, 4, T, LOG, {}, "fp32", "sdpa", False)
    run.step = 2  # after one warm-up step: cosine at 1/3 of the way from lr to min_lr=0
    run.set_lr()
    mult = 0.5 * (1 + torch.cos(torch.tensor(torch.pi / 3))).item()
    assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([0.1 * mult, 0.02 * mult])
    run.end()


def test_log_start_counts_the_trainable_parameters_only(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)
    run = TrainingRun("rm", tmp_path, D.Wrapped(model), torch.optim.SGD(model[1].parameters(), lr=0.1), plan, 4, T,
                      LOG, {}, "fp32", "sdpa", False)
    run.log_start({"n_prompts": 7})
    run.end()
    first = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert first["event"] == "start" and first["trainable_params"] == 3 and first["total_steps"] == 4
    assert first["n_prompts"] == 7 and first["world_size"] == 1

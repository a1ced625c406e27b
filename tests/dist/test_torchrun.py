"""Several processes under torchrun, on CPU with gloo: FSDP2 and DDP train exactly like one
process with the same global batch, sharded checkpoints resume on a different number of
ranks, and the final model is an ordinary Hugging Face folder.

Each launch starts two Python processes (about 10 s on two cores); the one-process runs are
in-process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructkit.config import DPOConfig, GRPOConfig, PPOConfig, PretrainConfig, RMConfig, SFTConfig, load_config

REPO = Path(__file__).resolve().parents[2]
QUIET = ["log.tensorboard=false", "log.progress=false"]
SFT_FULL = ["train.max_steps=4", "train.micro_batch_size=2", "train.save_every=2", "train.eval_every=2", *QUIET]


def torchrun(nproc: int, command: str, config: str, *overrides: str, env: dict | None = None) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "instructkit", command, config, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"torchrun failed:\n{r.stdout[-3000:]}\n{r.stderr[-8000:]}"


def one_process(stage: str, cls, config: str, *overrides: str, resume: bool = False):
    import importlib

    old = os.getcwd()
    os.chdir(REPO)
    try:
        cfg = load_config(cls, REPO / config, list(overrides))
        return importlib.import_module(f"instructkit.stages.{stage}").run(cfg, resume=resume)
    finally:
        os.chdir(old)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def curve(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in records(run_dir) if key in r}


def assert_same_curve(a: Path, b: Path, key: str = "loss", rel: float = 1e-5) -> None:
    ca, cb = curve(a, key), curve(b, key)
    assert ca and ca.keys() == cb.keys(), (ca, cb)
    for step in ca:
        assert cb[step] == pytest.approx(ca[step], rel=rel, abs=1e-6), (key, step, ca, cb)


def safetensors_of(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory):
    """A full fine-tune, 4 steps of global batch 4: on 2 ranks (FSDP2, micro-batch 2) and in
    one process (micro-batch 2, accumulation 2)."""
    root = tmp_path_factory.mktemp("dist-full")
    torchrun(2, "sft", "configs/tiny/sft_full.yaml", f"output_dir={root / 'two'}", *SFT_FULL)
    one_process("sft", SFTConfig, "configs/tiny/sft_full.yaml", f"output_dir={root / 'one'}", *SFT_FULL,
                "train.grad_accum=2")
    return root


def test_two_fsdp_ranks_train_like_one_process(full_runs):
    assert [r["world_size"] for r in records(full_runs / "two") if r.get("event") == "start"] == [2]
    assert [r["effective_batch_size"] for r in records(full_runs / "two") if r.get("event") == "start"] == [4]
    assert_same_curve(full_runs / "one", full_runs / "two", "loss")
    assert_same_curve(full_runs / "one", full_runs / "two", "grad_norm", rel=1e-4)
    assert_same_curve(full_runs / "one", full_runs / "two", "eval_loss")
    assert curve(full_runs / "two")[4] < curve(full_runs / "two")[1]  # it trained


def test_zero_stage_2_with_activation_checkpointing_trains_the_same(full_runs, tmp_path):
    # ZeRO-2 = FSDP2 keeping parameters gathered after forward; checkpointing per decoder layer
    torchrun(2, "sft", "configs/tiny/sft_full.yaml", f"output_dir={tmp_path}", *SFT_FULL,
             "distributed.zero_stage=2", "model.gradient_checkpointing=true")
    assert_same_curve(full_runs / "one", tmp_path, "loss")
    assert_same_curve(full_runs / "one", tmp_path, "eval_loss")


def test_final_model_is_gathered_into_plain_safetensors(full_runs):
    from transformers import AutoModelForCausalLM

    final = full_runs / "two" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)  # an ordinary Hugging Face folder
    theirs = dict(model.named_parameters())
    ours = AutoModelForCausalLM.from_pretrained(full_runs / "one" / "final")
    for name, p in ours.named_parameters():
        torch.testing.assert_close(theirs[name], p, rtol=1e-4, atol=1e-5)
    assert (full_runs / "two" / "checkpoints" / "step-000004" / "sharded" / ".metadata").is_file()


@pytest.mark.parametrize("ranks", [1, 2])
def test_two_rank_checkpoint_resumes_on_one_and_two_ranks(full_runs, tmp_path, ranks):
    run = tmp_path / "resumed"
    shutil.copytree(full_runs / "two", run)
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-000004")  # as if killed after step 3
    if ranks == 1:
        one_process("sft", SFTConfig, "configs/tiny/sft_full.yaml", f"output_dir={run}", *SFT_FULL,
                    "train.grad_accum=2", resume=True)
    else:
        torchrun(2, "sft", "configs/tiny/sft_full.yaml", f"output_dir={run}", *SFT_FULL, "--resume")
    assert_same_curve(full_runs / "two", run, "loss")
    assert_same_curve(full_runs / "two", run, "eval_loss")
    a = safetensors_of(full_runs / "two" / "final")
    b = safetensors_of(run / "final")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_ddp_lora_trains_like_one_process(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    common = ["train.max_steps=3", "train.micro_batch_size=2", "adapter.dropout=0.0", "train.eval_every=3", *QUIET]
    torchrun(2, "sft", "configs/tiny/sft_lora.yaml", f"output_dir={tmp_path / 'two'}", *common,
             "distributed.strategy=ddp")
    one_process("sft", SFTConfig, "configs/tiny/sft_lora.yaml", f"output_dir={tmp_path / 'one'}", *common,
                "train.grad_accum=2")
    assert_same_curve(tmp_path / "one", tmp_path / "two", "loss")
    assert_same_curve(tmp_path / "one", tmp_path / "two", "eval_loss")
    final = tmp_path / "two" / "final"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(final / "base"), final)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(float(p.abs().max()) > 0 for p in lora_b)  # trained (B starts at zero)


@pytest.mark.parametrize("stage,cls,config,extra", [
    ("rm", RMConfig, "configs/tiny/rm.yaml", ["train.micro_batch_size=4"]),
    ("dpo", DPOConfig, "configs/tiny/dpo.yaml", ["train.micro_batch_size=4"]),
    ("pretrain", PretrainConfig, "configs/pretrain_tiny.yaml", ["train.micro_batch_size=4", "data.num_workers=1"]),
])
def test_other_stages_on_two_ranks_match_one_process(tmp_path, stage, cls, config, extra):
    common = ["train.max_steps=3", "train.eval_every=3", *extra, *QUIET]
    torchrun(2, stage, config, f"output_dir={tmp_path / 'two'}", *common)
    one_process(stage, cls, config, f"output_dir={tmp_path / 'one'}", *common, "train.grad_accum=2")
    assert_same_curve(tmp_path / "one", tmp_path / "two", "loss", rel=1e-4)
    assert_same_curve(tmp_path / "one", tmp_path / "two", "eval_loss", rel=1e-4)
    if stage in ("rm", "dpo"):
        assert_same_curve(tmp_path / "one", tmp_path / "two", "accuracy", rel=1e-6)
    assert (tmp_path / "two" / "final").is_dir()


def test_global_advantage_whitening_equals_one_process(tmp_path):
    out = tmp_path / "whiten.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(Path(__file__).with_name("whiten_worker.py")), str(out)]
    r = subprocess.run(cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-5000:]
    result = json.loads(out.read_text())
    assert result["max_err"] < 1e-5
    assert result["rank0_local_err"] > 1e-2  # per-rank statistics would differ: the test can tell


def test_ppo_on_two_ranks_samples_everywhere_and_resumes_on_one(tmp_path):
    from safetensors.torch import load_file

    common = ["train.max_steps=4", "train.save_every=2", "rollout.prompts_per_step=4", "rollout.micro_batch_size=4",
              "ppo.mini_batch_size=4", *QUIET,  # the shared-base LoRA layout on the random tiny model
              "policy.name_or_path=tiny-llama", "adapter.kind=lora", "adapter.r=8", "adapter.alpha=16"]
    run = tmp_path / "two"
    torchrun(2, "ppo", "configs/tiny/ppo.yaml", f"output_dir={run}", *common)
    rows = records(run)
    assert [r["world_size"] for r in rows if r.get("event") == "start"] == [2]
    steps = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert all(r["response_len"] > 0 and r["time_generate"] > 0 for r in steps)
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)  # the policy moved
    assert (run / "final" / "value" / "value_head.safetensors").is_file()
    # The 2-rank checkpoint at step 2 continues in one process (8 prompts per step = 2 x 4).
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-000004")
    one_process("ppo", PPOConfig, "configs/tiny/ppo.yaml", f"output_dir={run}", *common,
                "rollout.prompts_per_step=8", "ppo.mini_batch_size=4", resume=True)
    rows = records(run)
    assert [r["step"] for r in rows if "reward_mean" in r] == [1, 2, 3, 4]
    assert [r["world_size"] for r in rows if r.get("event") == "start"] == [2, 1]
    assert (run / "final" / "adapter_model.safetensors").is_file()


# Rank 0 scores by answer length (groups with signal), rank 1 scores 0 (every group all-equal):
# rank 1 asks for new rollouts each step and rank 0 must take part in each, or the run hangs.
RANK_REWARD = """
import json, os

def score(prompts, responses):
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(os.environ["REWARD_LOG"], f"rank{rank}.jsonl"), "a") as f:
        f.write(json.dumps(prompts) + "\\n")
    return [float(len(r) % 2) if rank == 0 else 0.0 for r in responses]
"""


def test_grpo_on_two_ranks_keeps_groups_whole_and_resamples_in_step(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    (tmp_path / "rank_reward.py").write_text(RANK_REWARD)
    log = tmp_path / "calls"
    log.mkdir()
    common = ["train.max_steps=2", "train.save_every=1", "rollout.prompts_per_step=2", "rollout.micro_batch_size=8",
              "grpo.group_size=4", "grpo.mini_batch_size=8", "grpo.resample_rounds=2", "reward.function=rank_reward:score",
              "policy.name_or_path=tiny-llama", "adapter.kind=lora", "adapter.r=8", "adapter.alpha=16", *QUIET]
    run = tmp_path / "two"
    torchrun(2, "grpo", "configs/tiny/grpo.yaml", f"output_dir={run}", *common,
             env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "REWARD_LOG": str(log)})
    calls = {r: [json.loads(line) for line in (log / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)}
    # Each step: the rollout plus 2 extra rounds (rank 1 never has signal), on both ranks alike.
    assert len(calls[0]) == len(calls[1]) == 2 * 3
    for prompts in calls[0] + calls[1]:  # a group's 4 answers are scored together, on one rank
        assert len(prompts) == 8 and all(len(set(prompts[i:i + 4])) == 1 for i in (0, 4))
    for i in (0, 3):  # the first rollout of each step: the two ranks drew different prompts
        assert not set(calls[0][i]) & set(calls[1][i])
    steps = [r for r in records(run) if "reward_mean" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["resample_rounds"] == 2 for r in steps)
    adapter = load_file(run / "final" / "adapter_model.safetensors")
    assert any(float(v.abs().max()) > 0 for k, v in adapter.items() if "lora_B" in k)
    # The 2-rank checkpoint of step 1 continues in one process (4 prompts per step = 2 x 2).
    shutil.rmtree(run / "final")
    shutil.rmtree(run / "checkpoints" / "step-000002")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("REWARD_LOG", str(log))
    one_process("grpo", GRPOConfig, "configs/tiny/grpo.yaml", f"output_dir={run}", *common,
                "rollout.prompts_per_step=4", resume=True)
    rows = records(run)
    assert [r["step"] for r in rows if "reward_mean" in r] == [1, 2]
    assert [r["world_size"] for r in rows if r.get("event") == "start"] == [2, 1]

"""The SFT stage end to end on a tiny random LLaMA (CPU, seconds each)."""

import json
from pathlib import Path

import pytest
import torch

from instructkit.config import SFTConfig, load_config
from instructkit.stages import sft

REPO = Path(__file__).resolve().parents[2]


def examples_file(tmp_path, n=16):
    rows = [
        {"instruction": f"Repeat the word number {i}.", "input": "", "output": f"word {i} word {i} word {i}"}
        for i in range(n)
    ]
    p = tmp_path / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def config(tmp_path, *overrides, data=None):
    base = [
        f"output_dir={tmp_path / 'run'}",
        f"data.train={data or examples_file(tmp_path)}",
        "data.format=alpaca",
        "data.max_seq_len=64",
        "data.val_fraction=0.25",
        "train.max_steps=4",
        "train.micro_batch_size=2",
        "train.lr=5e-3",
        "log.progress=false",
        "log.tensorboard=false",
    ]
    if any(o.startswith("adapter.kind=") and o != "adapter.kind=none" for o in overrides):
        base.append("adapter.dropout=0.0")  # (with no adapter, an adapter setting is rejected)
    return load_config(SFTConfig, None, base + list(overrides))


def metrics(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def base_state(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # peft wraps each adapted Linear: its frozen weight becomes "<name>.base_layer.weight"
    return {k.replace(".base_layer.", "."): v.detach().clone() for k, v in base.state_dict().items() if "lora_" not in k}


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_adapter_changes_adapter_only_and_saved_adapter_gives_same_logits(tmp_path, kind):
    from instructkit import models as M

    cfg = config(tmp_path, f"adapter.kind={kind}")
    torch.manual_seed(0)
    reference = M.build_tiny_model("tiny-llama", seed=cfg.train.seed)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    result = sft.run(cfg)
    model = result.model
    after = base_state(model)
    for k, v in before.items():
        assert torch.equal(after[k], v), f"base weight {k} changed under LoRA"
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero: it moved

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = result.final_dir
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(final / "base"), final)
    ids = torch.tensor([[1, 5, 9, 33, 7, 2]])
    model.eval(), loaded.eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits, atol=1e-5)
    records = metrics(cfg.output_dir)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "peak_mem_gb", "skipped_steps"):
        assert key in steps[0]
    assert any("eval_loss" in r for r in records)
    assert (Path(cfg.output_dir) / "config.yaml").is_file()


def test_full_finetune_overfits_eight_examples(tmp_path):
    cfg = config(
        tmp_path, "model.name_or_path=tiny-llama-256", "adapter.kind=none", "train.max_steps=60",
        "train.lr=1e-3", "train.micro_batch_size=8",
        "data.val_fraction=0", "train.warmup_steps=5", data=examples_file(tmp_path, n=8),
    )
    result = sft.run(cfg)
    losses = [r["loss"] for r in metrics(cfg.output_dir) if "loss" in r]
    assert losses[0] > 3.0
    assert losses[-1] < 0.3, losses[-10:]
    assert (result.final_dir / "model.safetensors").is_file()


def _interrupt_at(monkeypatch, step_to_fail):
    from instructkit.engine import run as R

    real = R.optimizer_step

    def flaky(model, optimizer, max_grad_norm, guard, loss, step):
        if step == step_to_fail:
            raise KeyboardInterrupt("simulated kill")
        return real(model, optimizer, max_grad_norm, guard, loss, step)

    monkeypatch.setattr(R, "optimizer_step", flaky)


@pytest.mark.parametrize("kind", ["lora", "none"])
def test_resumed_run_equals_uninterrupted(tmp_path, monkeypatch, kind):
    common = [f"adapter.kind={kind}", "train.max_steps=8", "train.save_every=3", "train.eval_every=4",
              *(["adapter.dropout=0.1"] if kind != "none" else [])]
    full = config(tmp_path, *common, "output_dir=" + str(tmp_path / "full"))
    sft.run(full)
    cut = config(tmp_path, *common, "output_dir=" + str(tmp_path / "cut"))
    _interrupt_at(monkeypatch, 7)  # killed during step 8, last checkpoint at step 6
    with pytest.raises(KeyboardInterrupt):
        sft.run(cut)
    monkeypatch.undo()
    assert (tmp_path / "cut" / "checkpoints" / "step-000006").is_dir()
    resumed = sft.run(cut, resume=True)
    a = [(r["step"], r["loss"]) for r in metrics(full.output_dir) if "loss" in r]
    b = [(r["step"], r["loss"]) for r in metrics(cut.output_dir) if "loss" in r]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    for (_, la), (_, lb) in zip(a, b):
        assert la == pytest.approx(lb, abs=1e-6)
    assert resumed.steps == 8


def test_accumulation_equals_bigger_batch(tmp_path):
    """micro-batch 2 x accumulation 2 and micro-batch 4 x accumulation 1 train the same model."""
    common = ["adapter.kind=none", "data.packing=false", "data.group_by_length=false",
              "train.max_steps=3", "data.val_fraction=0"]
    a = sft.run(config(tmp_path, *common, "train.micro_batch_size=2", "train.grad_accum=2", f"output_dir={tmp_path}/a"))
    b = sft.run(config(tmp_path, *common, "train.micro_batch_size=4", "train.grad_accum=1", f"output_dir={tmp_path}/b"))
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), n


def test_packing_gives_same_loss_as_unpacked(tmp_path):
    """One step from identical weights: packed rows and one-example rows give the same loss."""
    common = ["adapter.kind=none", "train.max_steps=1", "data.val_fraction=0", "train.micro_batch_size=16"]
    a = sft.run(config(tmp_path, *common, "data.packing=true", f"output_dir={tmp_path}/a"))
    b = sft.run(config(tmp_path, *common, "data.packing=false", f"output_dir={tmp_path}/b"))
    la = [r["loss"] for r in metrics(tmp_path / "a") if "loss" in r][0]
    lb = [r["loss"] for r in metrics(tmp_path / "b") if "loss" in r][0]
    assert la == pytest.approx(lb, abs=1e-5)


def test_early_stopping_stops_and_saves(tmp_path):
    cfg = config(tmp_path, "adapter.kind=none", "train.max_steps=40", "train.lr=0.5", "train.eval_every=2",
                 "train.early_stopping_patience=2", "train.max_grad_norm=null")
    result = sft.run(cfg)
    assert result.stopped_early and result.steps < 40
    assert any(r.get("event") == "early_stop" for r in metrics(cfg.output_dir))


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    from instructkit.errors import UserError

    cfg = config(tmp_path, "adapter.kind=lora", "train.max_steps=2")
    sft.run(cfg)
    before = sorted(p.name for p in Path(cfg.output_dir).iterdir())
    with pytest.raises(UserError, match="--resume"):
        sft.run(cfg)
    assert sorted(p.name for p in Path(cfg.output_dir).iterdir()) == before


@pytest.mark.parametrize("name", ["sft_lora.yaml", "sft_full.yaml"])
def test_shipped_tiny_configs_train(tmp_path, monkeypatch, name):
    monkeypatch.chdir(REPO)
    cfg = load_config(SFTConfig, REPO / "configs" / "tiny" / name,
                      [f"output_dir={tmp_path / 'run'}", "train.max_steps=20"])
    result = sft.run(cfg)
    records = metrics(cfg.output_dir)
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert len(evals) >= 1
    assert result.final_dir.is_dir()


def test_nonfinite_steps_are_skipped_then_stop_with_diagnosis(tmp_path, monkeypatch):
    from instructkit.engine import fit as F
    from instructkit.errors import TrainingDiverged

    real = F.accumulate
    calls = {"n": 0}

    def poisoned(model, stage, specs):
        calls["n"] += 1
        loss, parts = real(model, stage, specs)
        return (float("nan") if calls["n"] >= 3 else loss), parts

    monkeypatch.setattr(F, "accumulate", poisoned)
    cfg = config(tmp_path, "adapter.kind=none", "train.max_steps=10", "train.max_nonfinite_steps=3")
    with pytest.raises(TrainingDiverged, match="(?s)3 steps in a row.*learning rate"):
        sft.run(cfg)
    steps = [r for r in metrics(cfg.output_dir) if "loss" in r]
    assert [r["skipped_steps"] for r in steps] == [0, 0, 1, 2]


def test_sample_generations_are_logged(tmp_path):
    cfg = config(tmp_path, "adapter.kind=lora", "train.max_steps=2", "log.generation_freq=1",
                 "log.generation_max_new_tokens=4", "log.tensorboard=true", "log.generation_prompts=[Hello]")
    sft.run(cfg)
    rows = [json.loads(l) for l in (Path(cfg.output_dir) / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(1, "Hello"), (2, "Hello")]
    assert list((Path(cfg.output_dir) / "tensorboard").iterdir())


def test_exploded_weights_stop_the_run_and_the_good_checkpoints_stay(tmp_path, monkeypatch):
    """An update that blows the weights up (finite loss, finite gradient: what lr=1e30 does)
    stops the run at that step; no checkpoint or final model ever holds those weights, and
    keep_last's good checkpoints are not pushed out."""
    from safetensors.torch import load_file

    from instructkit.errors import TrainingDiverged

    real = sft.build_optimizer

    def blowing_up(model, t, device):
        opt, calls = real(model, t, device), {"n": 0}
        step = opt.step

        def poisoned_step(*a, **k):
            step(*a, **k)
            calls["n"] += 1
            if calls["n"] == 4:
                with torch.no_grad():
                    next(p for p in model.parameters() if p.requires_grad).mul_(1e30)

        opt.step = poisoned_step
        return opt

    monkeypatch.setattr(sft, "build_optimizer", blowing_up)
    cfg = config(tmp_path, "adapter.kind=none", "train.max_steps=8", "train.save_every=1", "train.keep_last=2",
                 "train.max_nonfinite_steps=100")
    with pytest.raises(TrainingDiverged, match="step 4: the update left the weights with .w. up to"):
        sft.run(cfg)
    ckpts = sorted(p.name for p in (Path(cfg.output_dir) / "checkpoints").iterdir())
    assert ckpts == ["step-000002", "step-000003"] and not (Path(cfg.output_dir) / "final").exists()
    for name in ckpts:
        weights = load_file(Path(cfg.output_dir) / "checkpoints" / name / "weights.safetensors")
        assert max(float(w.abs().max()) for w in weights.values()) < 100


@pytest.mark.parametrize("when", ["checkpoint", "final"])
def test_a_full_disk_is_one_line_and_the_last_checkpoint_survives(tmp_path, monkeypatch, when):
    """ENOSPC while saving was a traceback: now it names the folder, the space left there and
    the checkpoint that is intact; the half-written checkpoint is removed (it only takes space)."""
    import errno

    from instructkit.engine import checkpoint as C
    from instructkit.errors import UserError
    from instructkit.models import save as S

    real_save_file, real_write_final = C.save_file, S.write_final

    def full_at_step_4(tensors, path, *a, **k):
        if "step-000004" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_file(tensors, path, *a, **k)

    def full_final(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    if when == "checkpoint":
        monkeypatch.setattr(C, "save_file", full_at_step_4)
    else:
        monkeypatch.setattr(S, "write_final", full_final)
    cfg = config(tmp_path, "train.save_every=2", "train.max_steps=4")
    with pytest.raises(UserError) as e:
        sft.run(cfg)
    msg = str(e.value)
    ckpts = tmp_path / "run" / "checkpoints"
    what = "the checkpoint of step 4" if when == "checkpoint" else "the final model"
    where = ckpts if when == "checkpoint" else tmp_path / "run" / "final"
    assert f"no space left on the disk of {where} while writing {what} (" in msg and " free there)" in msg, msg
    last = ckpts / ("step-000002" if when == "checkpoint" else "step-000004")
    assert f"the last checkpoint, {last}, is intact" in msg and "--resume" in msg
    assert C.verify_checkpoint(last) is None
    assert not list(ckpts.glob("*.tmp")) and not (tmp_path / "run" / "final").exists()
    assert not list((tmp_path / "run").glob("final.tmp"))

"""Reward model and DPO end to end on a tiny random LLaMA (CPU, seconds each)."""

import json
import math
from pathlib import Path

import pytest
import torch

from instructkit.config import DPOConfig, RMConfig, load_config
from instructkit.errors import ConfigError
from instructkit.stages import dpo, rm

REPO = Path(__file__).resolve().parents[2]


def synthetic_pairs(tmp_path, n=48):
    """A learnable preference: the chosen answer agrees politely, the rejected one refuses."""
    rows = [{"prompt": f"Request number {i}: please help.",
             "chosen": f"Sure, happy to help with request {i}.",
             "rejected": f"No. Go away {i}."} for i in range(n)]
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def ranked_file(tmp_path):
    rows = [{"prompt": f"Q{i}", "responses": [f"best answer {i}", f"ok answer {i}", f"bad {i}"]} for i in range(6)]
    p = tmp_path / "ranked.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def cfg_of(cls, tmp_path, *overrides, data=None, name="run"):
    base = [f"output_dir={tmp_path / name}", f"data.train={data or synthetic_pairs(tmp_path)}",
            "data.max_seq_len=64", "data.val_fraction=0.25", "train.max_steps=4", "train.micro_batch_size=4",
            "train.lr=2e-3", "log.progress=false", "log.tensorboard=false"]  # (dropout: off by default)
    return load_config(cls, None, base + list(overrides))


def records(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_reward_model_learns_a_learnable_preference(tmp_path):
    cfg = cfg_of(RMConfig, tmp_path, "adapter.kind=none", "model.name_or_path=tiny-llama-256",
                 "train.max_steps=30", "train.lr=1e-3", "train.eval_every=10")
    result = rm.run(cfg)
    assert result.eval_metrics["eval_accuracy"] > 0.9
    steps = [r for r in records(cfg.output_dir) if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"] and "accuracy" in steps[0]

    from transformers import AutoModelForSequenceClassification

    from instructkit.models import load_reward_stats, reward_scores

    loaded = AutoModelForSequenceClassification.from_pretrained(result.final_dir).eval()
    assert loaded.config.num_labels == 1
    mean, std = load_reward_stats(result.final_dir)
    assert (mean, std) == pytest.approx((result.reward_mean, result.reward_std)) and std > 0
    ids = torch.tensor([[5, 9, 33, 7, 2, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0]])
    result.model.eval()
    with torch.no_grad():
        assert torch.allclose(reward_scores(result.model, ids, mask), reward_scores(loaded, ids, mask), atol=1e-5)


def test_reward_model_lora_trains_head_and_adapter_only(tmp_path):
    cfg = cfg_of(RMConfig, tmp_path, "adapter.kind=lora", "model.freeze_layers=1")
    result = rm.run(cfg)
    trainable = {n for n, p in result.model.named_parameters() if p.requires_grad}
    assert any("score" in n for n in trainable) and any("lora_" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    assert not any("layers.0." in n for n in trainable)  # frozen first layer: no adapter trained there


def test_ranked_lists_train_on_all_pairs(tmp_path):
    cfg = cfg_of(RMConfig, tmp_path, "data.format=ranked", "data.val_fraction=0", "adapter.kind=lora",
                 data=ranked_file(tmp_path))
    rm.run(cfg)
    start = records(cfg.output_dir)[0]
    assert start["data_n_train_pairs"] == 6 * 3  # K=3 -> 3 pairs per prompt


def test_num_padding_at_beginning_is_explained(tmp_path):
    with pytest.raises(ConfigError, match="num_padding_at_beginning.*attention mask"):
        cfg_of(RMConfig, tmp_path, "rm.num_padding_at_beginning=1")
    cfg_of(RMConfig, tmp_path, "rm.num_padding_at_beginning=0")  # the no-op value is accepted


def test_dpo_starts_at_log2_and_learns(tmp_path):
    cfg = cfg_of(DPOConfig, tmp_path, "adapter.kind=lora", "train.max_steps=25", "train.lr=5e-3", "dpo.beta=0.5")
    result = dpo.run(cfg)
    steps = [r for r in records(cfg.output_dir) if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at start
    assert steps[-1]["loss"] < 0.5 and steps[-1]["accuracy"] == 1.0
    for key in ("margin", "chosen_reward", "rejected_reward", "chosen_logps", "rejected_logps"):
        assert key in steps[-1]
    assert result.eval_metrics["eval_accuracy"] > 0.9


def test_disabled_adapter_reference_equals_frozen_copy_and_holds_no_copy(tmp_path, monkeypatch):
    from instructkit import models as M
    from instructkit.config import AdapterConfig, ModelConfig
    from instructkit.data import collate_preference, build_preference_data
    from instructkit.engine.lm import completion_logps

    cfg = cfg_of(DPOConfig, tmp_path, "adapter.kind=lora", "train.max_steps=3")

    def no_second_copy(*a, **k):
        raise AssertionError("a LoRA DPO run must not load a second copy of the weights")

    monkeypatch.setattr(dpo, "frozen_reference", no_second_copy)
    result = dpo.run(cfg)  # trains with the adapter-off reference only
    monkeypatch.undo()
    policy, tok = result.model, result.tokenizer
    ref = dpo.Reference(policy)
    # ... and its log-probs (adapter off) equal those of a frozen copy of the base.
    torch.manual_seed(cfg.train.seed)
    copy = M.load_model(ModelConfig(name_or_path="tiny-llama"), AdapterConfig(kind="none"), tok, torch.device("cpu"),
                        seed=cfg.train.seed).eval()
    data = build_preference_data(cfg.data, tok, seed=0)
    batch = collate_preference(data.train, [0, 1, 2], tok.pad_token_id)
    with torch.no_grad():
        via_adapter_off = ref.logps(batch, average=False)
        via_copy = completion_logps(copy, batch)
        trained = completion_logps(policy.eval(), batch)
    assert torch.allclose(via_adapter_off, via_copy, atol=1e-5)
    assert not torch.allclose(trained, via_copy, atol=1e-3)  # the adapter did move the policy


@pytest.mark.parametrize("loss", ["ipo", "hinge", "conservative"])
def test_dpo_loss_variants_train(tmp_path, loss):
    extra = ["dpo.label_smoothing=0.1"] if loss == "conservative" else []
    cfg = cfg_of(DPOConfig, tmp_path, "adapter.kind=lora", f"dpo.loss={loss}", "train.max_steps=12",
                 "train.lr=5e-3", *extra)
    dpo.run(cfg)
    steps = [r for r in records(cfg.output_dir) if "loss" in r]
    assert steps[-1]["loss"] < steps[0]["loss"]


def test_full_finetune_dpo_with_precomputed_reference(tmp_path):
    on_the_fly = cfg_of(DPOConfig, tmp_path, "adapter.kind=none", "train.max_steps=3", name="a")
    pre = cfg_of(DPOConfig, tmp_path, "adapter.kind=none", "train.max_steps=3", "dpo.precompute_ref=true", name="b")
    dpo.run(on_the_fly)
    dpo.run(pre)
    a = [r["loss"] for r in records(on_the_fly.output_dir) if "loss" in r]
    b = [r["loss"] for r in records(pre.output_dir) if "loss" in r]
    assert a == pytest.approx(b, abs=1e-5)


@pytest.mark.parametrize("stage,cls", [(rm, RMConfig), (dpo, DPOConfig)])
def test_preference_stages_resume_exactly(tmp_path, monkeypatch, stage, cls):
    from instructkit.engine import run as R

    common = ["adapter.kind=lora", "train.max_steps=6", "train.save_every=2"]
    stage.run(cfg_of(cls, tmp_path, *common, name="full"))
    cut = cfg_of(cls, tmp_path, *common, name="cut")
    real = R.optimizer_step

    def flaky(model, optimizer, max_grad_norm, guard, loss, step):
        if step == 4:
            raise KeyboardInterrupt
        return real(model, optimizer, max_grad_norm, guard, loss, step)

    monkeypatch.setattr(R, "optimizer_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        stage.run(cut)
    monkeypatch.undo()
    stage.run(cut, resume=True)
    a = [(r["step"], r["loss"]) for r in records(tmp_path / "full") if "loss" in r]
    b = [(r["step"], r["loss"]) for r in records(tmp_path / "cut") if "loss" in r]
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 7))
    assert [l for _, l in a] == pytest.approx([l for _, l in b], abs=1e-6)


@pytest.mark.parametrize("name,stage,cls", [("rm.yaml", rm, RMConfig), ("dpo.yaml", dpo, DPOConfig)])
def test_shipped_tiny_preference_configs(tmp_path, monkeypatch, name, stage, cls):
    monkeypatch.chdir(REPO)
    cfg = load_config(cls, REPO / "configs" / "tiny" / name, [f"output_dir={tmp_path / 'run'}", "train.max_steps=6",
                                                                "train.eval_every=3", "train.save_every=3"])
    result = stage.run(cfg)
    assert result.final_dir.is_dir()
    assert any("eval_loss" in r for r in records(cfg.output_dir))


def test_bad_preference_input_is_a_clear_error(tmp_path, capsys):
    from instructkit.cli import main

    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt": "x", "good": "a", "bad": "b"}) + "\n")
    code = main(["rm", str(REPO / "configs/tiny/rm.yaml"), f"output_dir={tmp_path / 'r'}", f"data.train={p}",
                 "data.format=pairs"])
    err = capsys.readouterr().err
    assert code == 2 and "chosen" in err and "good" in err and "Traceback" not in err


def test_dpo_turns_dropout_off_by_default(tmp_path):
    """With LoRA dropout on, the policy's log-probs of one pair differ from pass to pass (three
    forwards gave losses 0.6977, 0.6988, 0.6921); TRL turns dropout off, as we do."""
    from instructkit.engine.lm import completion_logps

    common = ["adapter.kind=lora", "adapter.dropout=0.3", "train.max_steps=2"]  # step 1 makes lora_B non-zero
    ids = torch.tensor([[1, 5, 9, 14, 20, 33]])
    batch = {"input_ids": ids, "position_ids": torch.arange(6)[None], "attention_mask": torch.ones_like(ids),
             "target_ids": torch.tensor([[-100, -100, 14, 20, 33, -100]])}

    def three_passes(model):
        model.train()
        with torch.no_grad():
            return [float(completion_logps(model, batch)[0]) for _ in range(3)]

    off = dpo.run(cfg_of(DPOConfig, tmp_path, *common, name="off")).model
    on = dpo.run(cfg_of(DPOConfig, tmp_path, *common, "dpo.disable_dropout=false", name="on")).model
    a, b = three_passes(off), three_passes(on)
    assert a[0] == a[1] == a[2] and len(set(b)) == 3
    assert not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in off.modules())


def test_reward_model_turns_dropout_off_by_default(tmp_path):
    from instructkit.models import reward_scores

    common = ["adapter.kind=lora", "adapter.dropout=0.3", "train.max_steps=2"]
    ids = torch.tensor([[1, 5, 9, 14, 20, 33]])
    mask, pos = torch.ones_like(ids), torch.arange(6)[None]

    def three_passes(model):
        model.train()
        with torch.no_grad():
            return [float(reward_scores(model, ids, mask, pos)[0]) for _ in range(3)]

    off = three_passes(rm.run(cfg_of(RMConfig, tmp_path, *common, name="off")).model)
    on = three_passes(rm.run(cfg_of(RMConfig, tmp_path, *common, "rm.disable_dropout=false", name="on")).model)
    assert off[0] == off[1] == off[2]
    assert len(set(on)) == 3

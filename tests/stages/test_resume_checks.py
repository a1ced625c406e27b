"""`--resume` checks what it finds: the run that wrote the checkpoint, and the checkpoint's files."""

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from instructkit.config import DPOConfig, load_config
from instructkit.errors import UserError
from instructkit.stages import dpo, sft

from test_preference_stages import synthetic_pairs
from test_sft import config, metrics

LORA = ["adapter.kind=lora", "adapter.r=8", "train.save_every=1"]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def test_dpo_resume_on_an_sft_folder_is_refused_and_leaves_it_alone(tmp_path):
    cfg = config(tmp_path, *LORA, "train.max_steps=2")
    sft.run(cfg)
    before = (Path(cfg.output_dir) / "final" / "adapter_model.safetensors").read_bytes()
    d = load_config(DPOConfig, None, [f"output_dir={cfg.output_dir}", f"data.train={synthetic_pairs(tmp_path)}",
                                      "data.max_seq_len=64", "train.max_steps=2", "log.progress=false",
                                      "log.tensorboard=false", *LORA])
    with pytest.raises(UserError, match="written by `instructkit sft`, not `instructkit dpo`"):
        dpo.run(d, resume=True)
    assert (Path(cfg.output_dir) / "final" / "adapter_model.safetensors").read_bytes() == before


def test_a_changed_adapter_rank_is_refused_naming_it(tmp_path):
    sft.run(config(tmp_path, *LORA, "train.max_steps=2"))
    with pytest.raises(UserError, match=r"adapter \(kind, r, target_modules\).*'r': 8.*'r': 4"):
        sft.run(config(tmp_path, *LORA, "adapter.r=4", "train.max_steps=3"), resume=True)


def test_changed_data_is_refused_unless_allowed(tmp_path, caplog):
    cfg = config(tmp_path, *LORA, "train.max_steps=2")
    sft.run(cfg)
    data = Path(cfg.data.train)
    data.write_text(data.read_text() + json.dumps({"instruction": "new", "input": "", "output": "row"}) + "\n")
    longer = config(tmp_path, *LORA, "train.max_steps=3", data=data)
    with pytest.raises(UserError, match=f"(?s){data.name}.*changed.*--allow-new-data"):
        sft.run(longer, resume=True)
    with caplog.at_level(logging.WARNING, logger="instructkit.engine"):
        result = sft.run(longer, resume=True, allow_new_data=True)
    assert result.steps == 3 and "changed data" in caplog.text


@pytest.mark.parametrize("damage", ["weights.safetensors", "optimizer.safetensors", "state.json"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_intact_one(tmp_path, damage, caplog):
    full = config(tmp_path, "adapter.kind=none", "train.max_steps=6", "train.save_every=2", f"output_dir={tmp_path / 'a'}")
    sft.run(full)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    newest = tmp_path / "b" / "checkpoints" / "step-000006"
    f = newest / damage
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # truncated, as a full disk or a kill leaves it
    shutil.rmtree(tmp_path / "b" / "final")
    with caplog.at_level(logging.WARNING, logger="instructkit.engine"):
        sft.run(config(tmp_path, "adapter.kind=none", "train.max_steps=6", "train.save_every=2",
                       f"output_dir={tmp_path / 'b'}"), resume=True)
    assert "step-000006 is damaged" in caplog.text and "resuming from" in caplog.text
    assert (tmp_path / "b" / "checkpoints" / "step-000006.damaged").is_dir()
    assert losses(tmp_path / "b") == pytest.approx(losses(tmp_path / "a"), abs=1e-6)  # steps 5, 6 re-run alike
    a, b = (load_file(tmp_path / d / "final" / "model.safetensors") for d in "ab")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_every_checkpoint_damaged_is_one_clear_error(tmp_path):
    cfg = config(tmp_path, "adapter.kind=none", "train.max_steps=2", "train.save_every=1")
    sft.run(cfg)
    for ckpt in (Path(cfg.output_dir) / "checkpoints").iterdir():
        (ckpt / "weights.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(UserError, match=r"every checkpoint in .* is damaged .step-000002: weights.safetensors has 10 bytes, \d+ were written; step-000001"):
        sft.run(cfg, resume=True)


def test_a_checkpoint_of_another_model_shape_is_one_clear_error(tmp_path):
    from instructkit.engine import checkpoint as C
    from instructkit.engine.runtime import get_rng_state

    small, big = torch.nn.Linear(2, 3), torch.nn.Linear(2, 4)
    opt = torch.optim.SGD(small.parameters(), lr=0.1)
    path = C.save_checkpoint(tmp_path, 1, small, opt, {}, get_rng_state(), keep_last=1)
    with pytest.raises(UserError, match=r"'bias' has shape \(3,\) there and \(4,\) here"):
        C.load_checkpoint(path, big, None)
    frozen_bias = torch.nn.Linear(2, 3)
    frozen_bias.bias.requires_grad_(False)
    with pytest.raises(UserError, match="it holds 'bias', which this model does not train"):
        C.load_checkpoint(path, frozen_bias, None)


def test_allow_new_data_without_resume_is_refused(tmp_path, capsys):
    from instructkit.cli import main

    code = main(["sft", "configs/tiny/sft_lora.yaml", f"output_dir={tmp_path}", "--allow-new-data"])
    assert code == 2 and "--allow-new-data goes with --resume" in capsys.readouterr().err


def test_a_stage_from_a_lora_result_is_the_same_with_a_cold_or_warm_merge_cache(tmp_path, monkeypatch):
    """Filling the merged-adapter cache drew random numbers after seeding: step-1 grad_norm
    0.1874 (cold) vs 0.2078 (warm). It must not matter what the cache holds."""
    monkeypatch.setenv("INSTRUCTKIT_CACHE", str(tmp_path / "cache"))
    lora = config(tmp_path, "adapter.kind=lora", "train.max_steps=2", f"output_dir={tmp_path / 'lora'}")
    sft.run(lora)
    runs = []
    for name in ("cold", "warm"):
        cfg = config(tmp_path, "adapter.kind=lora", "train.max_steps=3", f"output_dir={tmp_path / name}",
                     f"model.name_or_path={tmp_path / 'lora' / 'final'}")
        sft.run(cfg)
        runs.append([(r["loss"], r["grad_norm"]) for r in metrics(cfg.output_dir) if "loss" in r])
    assert (tmp_path / "cache" / "merged").is_dir()
    assert runs[0] == runs[1]

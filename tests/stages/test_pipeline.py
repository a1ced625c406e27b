"""The whole recipe on a tiny random LLaMA: every stage, chaining, skip on re-run, resume."""

import json
from pathlib import Path

import pytest

from instructkit import pipeline as P

REPO = Path(__file__).resolve().parents[2]


def load(tmp_path, *overrides):
    return P.load_pipeline_config(REPO / "configs/tiny/pipeline.yaml", [f"output_dir={tmp_path / 'run'}", *overrides])


def test_pipeline_runs_every_stage_then_skips_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    cfg = load(tmp_path)
    # chaining: SFT feeds RM, PPO (policy and reference) and DPO; RM feeds PPO's reward and value
    sft_final = str(tmp_path / "run" / "sft" / "final")
    assert cfg.rm.model.name_or_path == sft_final and cfg.ppo.policy.name_or_path == sft_final
    assert cfg.dpo.model.name_or_path == sft_final and cfg.grpo.policy.name_or_path == sft_final
    assert cfg.ppo.reward.name_or_path == cfg.grpo.reward.name_or_path == str(tmp_path / "run" / "rm" / "final")
    assert cfg.eval.model == str(tmp_path / "run" / "ppo" / "final")
    done = P.run(cfg)
    assert set(done.values()) == {"ran"} and list(done) == ["sft", "rm", "ppo", "dpo", "grpo", "eval", "merge", "package"]
    out = tmp_path / "run"
    for name in ("sft", "rm", "ppo", "dpo", "grpo"):
        assert (out / name / "final").is_dir() and (out / name / "metrics.jsonl").is_file()
    results = json.loads((out / "eval" / "eval.json").read_text())
    assert "perplexity" in results["results"]
    assert (out / "merge" / "model.safetensors").is_file() and list((out / "package").glob("*.tar.gz"))
    again = P.run(load(tmp_path))
    assert set(again.values()) == {"skipped"}


def test_interrupted_stage_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    from instructkit.engine import run as R

    cfg = load(tmp_path, "stages=[sft]", "sft.train.save_every=5")
    real = R.optimizer_step

    def killed(model, optimizer, max_grad_norm, guard, loss, step):
        if step == 7:
            raise KeyboardInterrupt
        return real(model, optimizer, max_grad_norm, guard, loss, step)

    monkeypatch.setattr(R, "optimizer_step", killed)
    with pytest.raises(KeyboardInterrupt):
        P.run(cfg)
    monkeypatch.undo()
    assert not (tmp_path / "run" / "sft" / "final").exists()
    assert (tmp_path / "run" / "sft" / "checkpoints" / "step-000005").is_dir()
    done = P.run(load(tmp_path, "stages=[sft]", "sft.train.save_every=5"))
    assert done == {"sft": "ran"}
    rows = [json.loads(l) for l in (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 11))  # continued from step 5


def test_pipeline_config_errors_name_the_section(tmp_path):
    from instructkit.errors import ConfigError

    with pytest.raises(ConfigError, match="sft.train.lr_rate"):
        load(tmp_path, "sft.train.lr_rate=1")
    with pytest.raises(ConfigError, match="stages"):
        load(tmp_path, "stages=[sft,distill]")
    # a section the override misspells is the override's, not the YAML file's (as in load_config)
    with pytest.raises(ConfigError, match=r"^command line override sft.trian: unknown key 'trian'"):
        load(tmp_path, "sft.trian.lr=1")
    with pytest.raises(ConfigError, match=r"^command line override srt: unknown key 'srt'"):
        load(tmp_path, "srt.lr=1")


def test_a_pipeline_rerun_after_a_kill_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """Killed during rm (after the merged-adapter cache was filled) and re-run, the pipeline
    gives the reward model an uninterrupted run gives (it did not: the warm cache drew no
    random numbers, the cold one did)."""
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("INSTRUCTKIT_CACHE", str(tmp_path / "cache"))
    from instructkit.engine import run as R

    def run(name):
        return P.load_pipeline_config(REPO / "configs/tiny/pipeline.yaml",
                                      [f"output_dir={tmp_path / name}", "stages=[sft,rm]"])

    P.run(run("whole"))
    real = R.optimizer_step

    def killed_in_rm(model, optimizer, max_grad_norm, guard, loss, step):
        if step == 3 and model.config.num_labels == 1 and getattr(model, "score", None) is not None:
            raise KeyboardInterrupt
        return real(model, optimizer, max_grad_norm, guard, loss, step)

    monkeypatch.setattr(R, "optimizer_step", killed_in_rm)
    with pytest.raises(KeyboardInterrupt):
        P.run(run("cut"))
    monkeypatch.undo()
    monkeypatch.setenv("INSTRUCTKIT_CACHE", str(tmp_path / "cache"))
    assert (tmp_path / "cut" / "sft" / "final").is_dir() and not (tmp_path / "cut" / "rm" / "final").exists()
    P.run(run("cut"))
    curve = lambda name: [v for r in map(json.loads, (tmp_path / name / "rm" / "metrics.jsonl").read_text().splitlines())
                          if "loss" in r for v in (r["step"], r["loss"], r["grad_norm"])]
    assert len(curve("whole")) == 3 * 8 and curve("whole") == pytest.approx(curve("cut"), abs=1e-6)

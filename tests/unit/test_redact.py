"""Secrets out of what is printed and saved: secret-named config values, URL credentials,
known secret values and Authorization values in free text."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from instructkit.config import load_config, save_config
from instructkit.evaluate.config import EvalConfig
from instructkit.redact import mask_text, redact

REPO = Path(__file__).resolve().parents[2]


def test_mask_text():
    assert mask_text("see http://bob:pw@host:8000/v1 now") == "see http://***@host:8000/v1 now"
    assert mask_text("https://token@example.com/x") == "https://***@example.com/x"
    assert mask_text("plain http://host/v1 and me@example.com") == "plain http://host/v1 and me@example.com"
    assert mask_text('{"Authorization": "Bearer sk-1.2_3"}') == '{"Authorization": "Bearer ***"}'
    assert mask_text("basic YWxpY2U6cHc= end") == "basic *** end"
    assert mask_text("key k-123 twice k-123", ["k-123", ""]) == "key *** twice ***"


def test_redact_by_key_and_in_strings():
    cfg = {"log": {"wandb_api_key": "abc", "hf_token": "x", "max_new_tokens": 5, "password": "p"},
           "model": {"tokenizer": "path/to/tok", "name_or_path": "https://u:p@hub.example/m"},
           "judge": {"api_key_env": "OPENAI_API_KEY", "base_url": "http://u:p@h/v1"},
           "list": ["http://a:b@c/", 3]}
    assert redact(cfg) == {
        "log": {"wandb_api_key": "***", "hf_token": "***", "max_new_tokens": 5, "password": "***"},
        "model": {"tokenizer": "path/to/tok", "name_or_path": "https://***@hub.example/m"},
        "judge": {"api_key_env": "OPENAI_API_KEY", "base_url": "http://***@h/v1"},
        "list": ["http://***@c/", 3]}


def test_judge_credentials_stay_out_of_config_yaml_and_show(tmp_path):
    url = "judge.base_url=http://alice:hunter2@localhost:11434/v1"
    cfg = load_config(EvalConfig, REPO / "configs/eval.yaml", ["model=tiny-llama", url])
    assert "hunter2" in cfg.judge.base_url  # the run itself has it
    save_config(cfg, tmp_path / "config.yaml")
    saved = (tmp_path / "config.yaml").read_text()
    assert "hunter2" not in saved and "alice" not in saved
    assert yaml.safe_load(saved)["judge"]["base_url"] == "http://***@localhost:11434/v1"
    out = subprocess.run([sys.executable, "-m", "instructkit", "validate", "configs/eval.yaml",
                          "model=tiny-llama", url, "--stage", "eval", "--show"],
                         capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "hunter2" not in out.stdout + out.stderr and "http://***@localhost" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "instructkit", "validate", "configs/eval.yaml",
                          "model=tiny-llama", "judge.base_url=ftp://alice:hunter2@h/v1", "--stage", "eval"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "hunter2" not in bad.stderr and "ftp://***@h" in bad.stderr, bad.stderr

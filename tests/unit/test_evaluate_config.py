"""The eval config: loaded by instructkit.config.load_config with the same strictness as the
training configs; cross-field checks per chosen task."""

from __future__ import annotations

from pathlib import Path

import pytest

from instructkit.config import load_config
from instructkit.errors import ConfigError
from instructkit.evaluate.config import EvalConfig, default_output_dir

REPO = Path(__file__).resolve().parents[2]


def load(*overrides, path=REPO / "configs/eval.yaml"):
    return load_config(EvalConfig, path, list(overrides))


@pytest.mark.parametrize("name", ["configs/eval.yaml", "configs/tiny/eval.yaml"])
def test_shipped_eval_configs_load(name):
    cfg = load(path=REPO / name)
    assert cfg.tasks and cfg.out_dir()


def test_model_from_the_command_line_and_output_dir(tmp_path):
    cfg = load("model=runs/ppo/final")
    assert cfg.model == "runs/ppo/final" and cfg.out_dir() == str(Path("runs/ppo/eval"))
    assert cfg.output_dir is None  # check() derives, it does not fill the config in
    final = tmp_path / "x" / "final"
    final.mkdir(parents=True)
    assert default_output_dir(str(final)) == str(tmp_path / "x" / "eval")
    assert default_output_dir(str(tmp_path / "x")) == str(tmp_path / "x-eval")
    assert default_output_dir("HuggingFaceTB/SmolLM2-135M") == str(Path("runs/eval/HuggingFaceTB_SmolLM2-135M"))
    assert load(f"output_dir={tmp_path}/o").out_dir() == f"{tmp_path}/o"


@pytest.mark.parametrize("override, fragment", [
    ("tasks=[perplexity,bleu]", "'bleu' is not a valid choice"),
    ("judge.api_key=sk-secret", "Did you mean 'api_key_env'"),
    ("judge.backend=vllm", "choose one of 'openai', 'hf'"),
    ("samples.temperature=hot", "expected a number"),
    ("perplexity.format=csvish", "not a valid choice"),
    ("perplexity.batch_sizes=3", "Valid keys in section 'perplexity'"),
])
def test_schema_errors(override, fragment):
    with pytest.raises(ConfigError, match=fragment) as e:
        load(override)
    assert "sk-secret" not in str(e.value)


@pytest.mark.parametrize("overrides, fragment", [
    (["model="], "model is empty"),
    (["tasks=[]"], "tasks is empty"),
    (["tasks=[perplexity]", "perplexity.data="], "perplexity.data is empty"),
    (["tasks=[reward_accuracy]", "reward.data="], "reward.data is empty"),
    (["tasks=[samples]", "samples.prompts="], "samples.prompts is empty"),
    (["tasks=[samples]", "samples.temperature=-1"], "temperature"),
    (["tasks=[judge]", "judge.model="], "judge.model is empty"),
    (["tasks=[judge]", "judge.base_url=localhost:11434"], "http://"),
    (["tasks=[judge]", "judge.api_key_env=sk-abc123-xyz"], "NAME of an environment variable"),
    (["tasks=[judge]", "judge.backend=hf"], "judge.hf_model"),
    (["tasks=[judge]", "judge.concurrency=0"], "judge.concurrency"),
    (["tasks=[judge]", "judge.rubric_path=/nonexistent/rubric.md"], "file not found"),
    (["tasks=[pairwise]"], "exactly one of pairwise.responses_b"),
    (["tasks=[pairwise]", "pairwise.responses_b=/nonexistent.jsonl"], "file not found"),
])
def test_cross_field_checks(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load(*overrides)


def test_checks_only_for_chosen_tasks(tmp_path):
    cfg = load("tasks=[perplexity]", "judge.model=", "samples.prompts=", "reward.data=")
    assert cfg.tasks == ["perplexity"]
    answers = tmp_path / "a.jsonl"
    answers.write_text('{"prompt": "p", "response": "r"}\n')
    # judging given answers needs neither a model nor prompts
    cfg = load("model=", "tasks=[judge]", f"judge.responses={answers}", "samples.prompts=",
               f"output_dir={tmp_path}/o")
    assert cfg.judge.responses == str(answers)

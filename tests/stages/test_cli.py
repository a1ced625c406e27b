"""The CLI: every bad input gives a short message naming what is wrong, exit code 2, no traceback."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from instructkit.cli import main

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def run_cli(*args, cwd=None):
    proc = subprocess.run([sys.executable, "-m", "instructkit", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd or REPO)
    return proc.returncode, proc.stdout, proc.stderr


def good_data(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"instruction": f"Say {i}", "input": "", "output": f"{i}"}) + "\n" for i in range(8)))
    return p


def tiny_args(tmp_path, data):
    return [f"output_dir={tmp_path / 'run'}", f"data.train={data}", "data.format=alpaca",
            "train.max_steps=2", "log.progress=false", "log.tensorboard=false"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_config_validates(path, capsys):
    assert main(["validate", str(path)]) == 0
    assert "valid" in capsys.readouterr().out


def expect_error(capsys, argv, *fragments):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    for f in fragments:
        assert f in err, err
    return err


def test_unknown_key_and_wrong_type(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  train: x.jsonl\ntrain:\n  max_steps: 1\n  lr_rate: 0.1\n")
    expect_error(capsys, ["validate", str(cfg)], "c.yaml, line 5", "lr_rate", "Valid keys")
    cfg.write_text("data:\n  train: x.jsonl\ntrain:\n  max_steps: 1\n")
    expect_error(capsys, ["validate", str(cfg), "train.lr_rate=0"], "command line override train.lr_rate")
    cfg.write_text("data:\n  train: x.jsonl\ntrain:\n  max_steps: many\n")
    expect_error(capsys, ["sft", str(cfg)], "line 4", "max_steps", "expected an integer")


def test_missing_data_file(tmp_path, capsys):
    expect_error(capsys, ["sft", str(REPO / "configs/tiny/sft_lora.yaml"), *tiny_args(tmp_path, tmp_path / "nope.jsonl")],
                 "nope.jsonl")


def test_malformed_json_line(tmp_path, capsys):
    p = good_data(tmp_path)
    p.write_text(p.read_text() + '{"instruction": "x", "output": \n')
    expect_error(capsys, ["sft", str(REPO / "configs/tiny/sft_lora.yaml"), *tiny_args(tmp_path, p)], "d.jsonl", "line 9")


def test_missing_field(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    err = expect_error(capsys, ["sft", str(REPO / "configs/tiny/sft_lora.yaml"), *tiny_args(tmp_path, p)], "instruction")
    assert "question" in err  # the fields that were found


def test_empty_after_filtering(tmp_path, capsys):
    p = tmp_path / "d.jsonl"
    p.write_text("".join(json.dumps({"instruction": "word " * 200, "input": "", "output": "ok"}) + "\n" for _ in range(4)))
    expect_error(capsys, ["sft", str(REPO / "configs/tiny/sft_lora.yaml"), *tiny_args(tmp_path, p), "data.max_seq_len=16"],
                 "max_seq_len")


def test_model_path_that_does_not_exist(tmp_path, capsys):
    expect_error(capsys, ["sft", str(REPO / "configs/tiny/sft_lora.yaml"), *tiny_args(tmp_path, good_data(tmp_path)),
                          f"model.name_or_path={tmp_path / 'no-model'}"], "no-model")


def test_qlora_without_cuda(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    expect_error(capsys, ["sft", str(REPO / "configs/tiny/sft_lora.yaml"), *tiny_args(tmp_path, good_data(tmp_path)),
                          "adapter.kind=qlora"], "QLoRA", "CUDA")


def test_error_leaves_existing_output_intact(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    expect_error(capsys, ["sft", str(REPO / "configs/tiny/sft_lora.yaml"), *tiny_args(tmp_path, tmp_path / "missing.jsonl")],
                 "missing.jsonl")
    assert (out / "notes.txt").read_text() == "keep me"


def test_debug_shows_traceback(tmp_path):
    code, _, err = run_cli("validate", tmp_path / "missing.yaml", "--debug")
    assert code != 0 and "Traceback" in err
    code, _, err = run_cli("validate", tmp_path / "missing.yaml")
    assert code == 2 and "Traceback" not in err and "missing.yaml" in err


def test_sft_then_generate_from_the_command_line(tmp_path):
    data = good_data(tmp_path)
    code, out, err = run_cli("sft", REPO / "configs/tiny/sft_lora.yaml", *tiny_args(tmp_path, data))
    assert code == 0, err
    code, out, err = run_cli("generate", tmp_path / "run" / "final", "--prompt", "Say 3", "--max-new-tokens", "5",
                             "--temperature", "0")
    assert code == 0, err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Say 1"}) + "\n" + json.dumps({"prompt": "Say 2"}) + "\n")
    code, out, err = run_cli("generate", tmp_path / "run" / "final", "--prompts", prompts, "--output",
                             tmp_path / "r.jsonl", "--max-new-tokens", "4")
    assert code == 0, err
    rows = [json.loads(l) for l in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Say 1", "Say 2"] and all("response" in r for r in rows)


@pytest.mark.parametrize("argv", [["--debug", "validate", "/no/such.yaml"], ["validate", "/no/such.yaml", "--debug"]])
def test_debug_shows_the_traceback_before_or_after_the_subcommand(argv):
    """`--debug` before the subcommand was overwritten by the subcommand's own default."""
    from instructkit.cli import main
    from instructkit.errors import ConfigError

    with pytest.raises(ConfigError, match="config file not found"):
        main(argv)


@pytest.mark.parametrize("extra, fragments", [
    (["--prompt", "hi", "--max-new-tokens", "-1"], ["--max-new-tokens -1", "at least 1"]),
    (["--prompt", "hi", "--max-new-tokens", "0"], ["--max-new-tokens 0"]),
    (["--prompt", "hi", "--temperature", "-0.5"], ["--temperature -0.5"]),
    (["--prompt", "hi", "--top-p", "0"], ["--top-p 0"]),
    (["--prompt", "hi", "--top-p", "1.5"], ["--top-p 1.5"]),
    (["--prompt", "hi", "--batch-size", "0"], ["--batch-size 0"]),
    (["--prompt", "hi", "--top-k", "-1"], ["--top-k -1", "0 (off) or above"]),
    (["--prompt", "hi", "--repetition-penalty", "0"], ["--repetition-penalty 0", "above 0 (1: off)"]),
    (["--prompt", "hi", "--prompts", "p.jsonl"], ["--prompt or --prompts, not both"]),
    (["--prompts", "EMPTY"], ["empty.jsonl", "holds no prompts"]),
    (["--prompts", "BLANK"], ["blank.jsonl, record 2", "empty"]),
])
def test_generate_bad_arguments_are_one_line(tmp_path, capsys, extra, fragments):
    """Were a transformers traceback (max_new_tokens -1), exit 0 saying nothing (an empty prompt
    file), or silently ignored (--prompts beside --prompt)."""
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "blank.jsonl").write_text('{"prompt": "ok"}\n{"prompt": "  "}\n')
    extra = [str(tmp_path / "empty.jsonl") if a == "EMPTY" else str(tmp_path / "blank.jsonl") if a == "BLANK"
             else a for a in extra]
    expect_error(capsys, ["generate", "tiny-llama", *extra], *fragments)


@pytest.mark.parametrize("stage, config, override, fragment", [
    ("sft", "configs/tiny/sft_lora.yaml", "data.max_seq_len=100000", "data.max_seq_len = 100000"),
    ("rm", "configs/tiny/rm.yaml", "data.max_seq_len=100000", "data.max_seq_len = 100000"),
    ("dpo", "configs/tiny/dpo.yaml", "data.max_seq_len=100000", "data.max_seq_len = 100000"),
    ("ppo", "configs/tiny/ppo.yaml", "rollout.max_new_tokens=5000",
     "rollout.max_prompt_len + rollout.max_new_tokens = 5064"),
])
def test_sequences_longer_than_the_model_context_are_refused(tmp_path, capsys, stage, config, override, fragment):
    """data.max_seq_len=100000 on a model of 2048 positions ran (to 7.5 GB on a tiny model)."""
    over = ["policy.name_or_path=tiny-llama", "ppo.value_name_or_path=tiny-llama"] if stage == "ppo" else []
    err = expect_error(capsys, [stage, str(REPO / config), f"output_dir={tmp_path / 'run'}", override,
                                "log.tensorboard=false", *over],
                       fragment, "longer than the context of tiny-llama (2048 positions", "set it to 2048 or less")
    assert not (tmp_path / "run" / "final").exists(), err


def test_validate_show_prints_the_eval_folder_as_it_resolves(capsys):
    """An eval config without output_dir showed ``output_dir: null``; the run writes beside the
    model, and --show now says where."""
    import yaml

    assert main(["validate", str(REPO / "configs/eval.yaml"), "model=runs/x/final", "--stage", "eval", "--show"]) == 0
    shown = yaml.safe_load(capsys.readouterr().out.split("\n", 1)[1])
    assert shown["output_dir"] == str(Path("runs/x/eval"))
    assert main(["validate", str(REPO / "configs/eval.yaml"), "model=runs/x/final", "output_dir=elsewhere",
                 "--stage", "eval", "--show"]) == 0
    assert yaml.safe_load(capsys.readouterr().out.split("\n", 1)[1])["output_dir"] == "elsewhere"

"""`instructkit report`: report.html / report.md from a run folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from instructkit.errors import UserError  # noqa: E402
from instructkit.report import read_jsonl, sample_view, write_report  # noqa: E402


def _jsonl(path: Path, rows: list[dict], tail: str = "") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def make_sft(d: Path, cut_tail: str = "") -> None:
    rows = [{"step": 0, "event": "start", "total_steps": 4}]
    for s in range(1, 5):
        loss = 0.875 if s == 4 else 3.0 - 0.5 * s  # 0.875: the final train loss
        rows.append({"step": s, "loss": loss, "lr": 1e-4 * s, "grad_norm": 0.5, "epoch": s / 4})
        if s % 2 == 0:
            rows.append({"step": s, "eval_loss": 2.75 - 0.25 * s, "eval_ppl": 9.5})
    rows.append({"step": 4, "event": "end"})
    _jsonl(d / "metrics.jsonl", rows, cut_tail)
    _jsonl(d / "samples.jsonl", [
        {"step": 2, "prompt": "Say hi <politely>", "response": "hi there"},
        {"step": 2, "prompt": "Name a colour", "response": "blue"},
        {"step": 4, "prompt": "Say hi <politely>", "response": "<b>Hello</b> & welcome"},
        {"step": 4, "prompt": "Name a colour", "response": "green"},
    ])
    (d / "config.yaml").write_text("output_dir: runs/sft\n")


def make_ppo(d: Path) -> None:
    rows = [{"step": 0, "event": "start", "total_steps": 3}]
    for s in range(1, 4):
        rows.append({"step": s, "reward_mean": 0.1 * s, "kl": 0.01 * s, "response_len": 10 + s,
                     "policy_loss": -0.1, "value_loss": 0.5, "lr": 1e-5, "time_train": 0.3})
    rows[-1]["reward_mean"] = 0.4375
    rows.append({"step": 3, "event": "end"})
    _jsonl(d / "metrics.jsonl", rows)
    _jsonl(d / "samples.jsonl", [
        {"step": s, "prompt": f"prompt {s}", "response": f"answer {s}", "reward": 0.25 * s} for s in range(1, 4)])


def make_run(root: Path) -> Path:
    run = root / "run"
    make_sft(run / "sft")
    make_ppo(run / "ppo")
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "eval.json").write_text(json.dumps({
        "model": "run/ppo/final", "tasks": ["perplexity", "judge"],
        "results": {"perplexity": {"ppl": 12.3456, "loss": 2.5134, "tokens": 4096, "data": "val.jsonl"},
                    "judge": {"mean_score": 3.625, "n_scored": 8, "n_unparseable": 0}},
        "time_s": {"perplexity": 1.0}}))
    return run


def test_pipeline_report_complete(tmp_path):
    run = make_run(tmp_path)
    html_path, md_path = write_report(run)
    assert html_path == run / "report.html" and md_path == run / "report.md"
    page = html_path.read_text()
    md = md_path.read_text()

    # one embedded figure per stage, nothing external, no leftovers
    assert page.count('<img class="plot" alt="sft curves" src="data:image/png;base64,') == 1
    assert page.count('src="data:image/png;base64,') == 2
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page
    assert not list(run.glob("*.tmp"))
    assert page.index("Stage: sft") < page.index("Stage: ppo") < page.index("Evaluation")

    # final metrics: the last train and eval records
    assert "last train record (step 4)" in page
    train_table = page[page.index("last train record"):page.index("last eval record")]
    assert "<td>loss</td>" in train_table and ">0.875</td>" in train_table
    assert "last eval record (step 4)" in page and "eval_loss" in page and "1.75" in page
    assert "0.4375" in page and "response_len" in page
    # eval table
    for value in ("12.35", "2.513", "4096", "3.625", "perplexity", "mean_score", "run/ppo/final"):
        assert value in page, value
        assert value in md, value

    # samples: escaped, before and after the same prompt
    assert "&lt;b&gt;Hello&lt;/b&gt; &amp; welcome" in page
    assert "<b>Hello" not in page
    assert "Say hi &lt;politely&gt;" in page
    assert "Samples: before and after" in page
    assert page.index("hi there") < page.index("&lt;b&gt;Hello")
    # ppo: no repeated prompt -> first and last samples, with rewards
    assert "reward 0.75" in page and "reward 0.25" in page

    # markdown references PNGs that exist
    pngs = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", md)
    assert sorted(pngs) == ["report_ppo.png", "report_sft.png"]
    for name in pngs:
        data = (run / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    assert "<b>Hello</b> & welcome" in md  # inside a code block in markdown
    assert "0.875" in md and "0.4375" in md


def test_single_stage_folder(tmp_path):
    d = tmp_path / "sft_only"
    make_sft(d)
    html_path, md_path = write_report(d, title="my <run>")
    page = html_path.read_text()
    assert html_path.parent == d
    assert page.count('src="data:image/png;base64,') == 1
    assert "<title>my &lt;run&gt;</title>" in page
    assert (d / "report_sft_only.png").is_file()
    assert "report_sft_only.png" in md_path.read_text()
    assert "Evaluation" not in page


def test_cut_last_line_and_stage_selection(tmp_path):
    run = make_run(tmp_path)
    # a crash cut the last line of the sft metrics: the report still works
    make_sft(run / "sft", cut_tail='{"step": 5, "loss": 0.1')
    assert len(read_jsonl(run / "sft" / "metrics.jsonl")) == 8  # start, 4 train, 2 eval, end
    html_path, _ = write_report(run, stages=["sft"])
    page = html_path.read_text()
    assert page.count('src="data:image/png;base64,') == 1
    assert "0.875" in page and "Stage: ppo" not in page
    with pytest.raises(UserError, match="dpo"):
        write_report(run, stages=["dpo"])


def test_incomplete_and_empty(tmp_path):
    d = tmp_path / "rm"
    _jsonl(d / "metrics.jsonl", [{"step": 0, "event": "start"}, {"step": 1, "loss": 0.69, "accuracy": 0.5,
                                                                  "margin": 0.0, "lr": "nan"}])
    page = write_report(d)[0].read_text()
    assert "incomplete" in page and "0.69" in page and page.count("data:image/png;base64,") == 1
    with pytest.raises(UserError, match="nothing to report"):
        write_report(_empty(tmp_path))


def _empty(tmp_path: Path) -> Path:
    e = tmp_path / "empty"
    e.mkdir()
    return e


def test_sample_view_pairs_earliest_and_latest():
    view = sample_view([
        {"step": 3, "prompt": "a", "response": "mid"},
        {"step": 1, "prompt": "a", "response": "first"},
        {"step": 9, "prompt": "a", "response": "last"},
        {"step": 5, "prompt": "b", "response": "only"},
    ])
    assert [(x["response"], y["response"]) for x, y in view.pairs] == [("first", "last")]

"""`instructkit eval`: run the evaluation tasks of an :class:`EvalConfig` and write the report.

Writes to ``output_dir``:

- ``eval.json``: ``{"model", "tasks", "results": {task: metrics}, "time_s"}``; results of
  earlier runs of the same model in the same folder are kept for the tasks not run now;
- ``eval.md``: the same as a Markdown table;
- ``samples.jsonl`` (``samples_b.jsonl`` for ``pairwise.model_b``): prompts and responses;
- ``judgements.jsonl`` / ``pairwise.jsonl``: every judge verdict, appended as it arrives
  (what a re-run does not send again);
- ``config.yaml``: the resolved config.

Every file but the judgement logs is written to a temporary name and renamed, so a run
that stops leaves no half-written report behind.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import time
from pathlib import Path

from instructkit.evaluate.config import EvalConfig

log = logging.getLogger("instructkit.evaluate")

REPORT_FILE = "eval.json"
TABLE_FILE = "eval.md"
SAMPLES_FILE = "samples.jsonl"
SAMPLES_B_FILE = "samples_b.jsonl"
JUDGE_LOG = "judgements.jsonl"
PAIRWISE_LOG = "pairwise.jsonl"


def _dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.float32}.get(precision)


def _free(device) -> None:
    gc.collect()
    try:
        import torch

        if getattr(device, "type", "") == "cuda":
            torch.cuda.empty_cache()
    except Exception:  # noqa: BLE001 - freeing memory is best effort
        pass


def run(cfg: EvalConfig) -> dict:
    """Run ``cfg.tasks`` on ``cfg.model``; write the report files; return the report dict."""
    from instructkit.config import save_config
    from instructkit.models import resolve_device
    from instructkit.evaluate import judge as J
    from instructkit.evaluate.samples import (
        generate_samples, load_prompt_set, read_responses, write_jsonl_atomic,
    )

    cfg.check()
    out = Path(cfg.out_dir())
    tasks = list(dict.fromkeys(cfg.tasks))  # order kept, duplicates dropped
    want = set(tasks)
    device = resolve_device(cfg.device)
    dtype = _dtype(cfg.precision)
    amp = "bf16-mixed" if cfg.precision == "bf16-mixed" else "fp32"

    # Read every prompt file before the first model loads (bad input fails fast).
    judge_rubric = J.load_prompt_template(cfg.judge.rubric_path, "rubric") if "judge" in want else None
    pair_prompt = J.load_prompt_template(cfg.judge.pairwise_path, "pairwise") if "pairwise" in want else None
    given = read_responses(cfg.judge.responses, "judge.responses") if (
        want & {"judge", "pairwise"} and cfg.judge.responses) else None
    need_samples = "samples" in want or (bool(want & {"judge", "pairwise"}) and given is None)
    prompts = None
    if need_samples or (want & {"pairwise"} and cfg.pairwise.model_b):
        prompts = load_prompt_set(cfg.samples)
    rows_b = read_responses(cfg.pairwise.responses_b, "pairwise.responses_b") if (
        "pairwise" in want and cfg.pairwise.responses_b) else None

    out.mkdir(parents=True, exist_ok=True)
    save_config(dataclasses.replace(cfg, output_dir=str(out)), out / "config.yaml")  # as it resolved
    results: dict[str, dict] = {}
    times: dict[str, float] = {}

    rows = _own_model_tasks(cfg, want, need_samples, prompts, device, dtype, amp, out, results, times)
    rows_a = given if given is not None else rows

    if "reward_accuracy" in want:
        from instructkit.evaluate.reward_acc import load_reward_for_eval, reward_accuracy

        t0 = time.perf_counter()
        rm_path = cfg.reward.model or cfg.model
        rm, rm_tok = load_reward_for_eval(rm_path, device, dtype)
        results["reward_accuracy"] = {"reward_model": rm_path,
                                      **reward_accuracy(rm, rm_tok, cfg.reward, device, amp)}
        del rm, rm_tok
        _free(device)
        times["reward_accuracy"] = time.perf_counter() - t0

    if "pairwise" in want and rows_b is None:  # model B's answers to the same prompts
        from instructkit.models import load_for_inference

        t0 = time.perf_counter()
        model_b, tok_b = load_for_inference(cfg.pairwise.model_b, device=device, dtype=dtype)
        rows_b = generate_samples(model_b, tok_b, prompts, cfg.samples, device, amp, cfg.progress,
                                  description="samples B")
        write_jsonl_atomic(out / SAMPLES_B_FILE, rows_b)
        del model_b, tok_b
        _free(device)
        times["samples_b"] = time.perf_counter() - t0

    if want & {"judge", "pairwise"}:
        _judge_tasks(cfg, want, rows_a, rows_b, judge_rubric, pair_prompt, out, results, times)

    report = {"model": cfg.model, "tasks": tasks, "results": results, "time_s": times}
    report = _merge_previous(out / REPORT_FILE, report)
    write_report(out, report)
    return report


def _own_model_tasks(cfg, want: set, need_samples: bool, prompts, device, dtype, amp: str, out: Path,
                     results: dict, times: dict) -> list[dict] | None:
    """Perplexity and samples of the evaluated model, loaded once; its sample rows (or None)."""
    from instructkit.evaluate.samples import generate_samples, write_jsonl_atomic

    rows = None
    if want & {"perplexity"} or need_samples:
        from instructkit.models import load_for_inference

        t0 = time.perf_counter()
        model, tokenizer = load_for_inference(cfg.model, device=device, dtype=dtype)
        times["load_model"] = time.perf_counter() - t0
        if "perplexity" in want:
            from instructkit.evaluate.perplexity import evaluate_perplexity

            t0 = time.perf_counter()
            results["perplexity"] = evaluate_perplexity(model, tokenizer, cfg.perplexity, device, amp)
            times["perplexity"] = time.perf_counter() - t0
            log.info("perplexity %.4g on %s", results["perplexity"]["ppl"], cfg.perplexity.data)
        if need_samples:
            t0 = time.perf_counter()
            rows = generate_samples(model, tokenizer, prompts, cfg.samples, device, amp, cfg.progress)
            write_jsonl_atomic(out / SAMPLES_FILE, rows)
            times["samples"] = time.perf_counter() - t0
            results["samples"] = {
                "n": len(rows),
                "path": str(out / SAMPLES_FILE),
                "prompts": cfg.samples.prompts,
                "mean_response_chars": sum(len(r["response"]) for r in rows) / max(len(rows), 1),
                "n_empty": sum(1 for r in rows if not r["response"].strip()),
                "temperature": cfg.samples.temperature,
                "max_new_tokens": cfg.samples.max_new_tokens,
            }
        del model, tokenizer
        _free(device)
    return rows if need_samples else None


def _judge_tasks(cfg, want: set, rows_a, rows_b, judge_rubric, pair_prompt, out: Path, results: dict,
                 times: dict) -> None:
    """The LLM judge: rubric scores of this model's answers, and win rates against model B's."""
    from instructkit.evaluate import judge as J

    backend = J.make_judge(cfg.judge)
    try:
        if "judge" in want:
            t0 = time.perf_counter()
            results["judge"] = J.judge_responses(backend, rows_a, out / JUDGE_LOG, judge_rubric,
                                                 cfg.progress)
            results["judge"]["rubric"] = cfg.judge.rubric_path or "default"
            times["judge"] = time.perf_counter() - t0
        if "pairwise" in want:
            t0 = time.perf_counter()
            results["pairwise"] = J.pairwise_compare(backend, rows_a, rows_b, out / PAIRWISE_LOG,
                                                     pair_prompt, cfg.progress)
            results["pairwise"]["model_b"] = cfg.pairwise.model_b or cfg.pairwise.responses_b
            times["pairwise"] = time.perf_counter() - t0
    finally:
        backend.close()


def _merge_previous(path: Path, report: dict) -> dict:
    """Keep the results of tasks run earlier on the same model in the same folder."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        return report
    if not isinstance(old, dict) or old.get("model") != report["model"]:
        return report
    results = {**(old.get("results") or {}), **report["results"]}
    return {**report, "results": results, "tasks": list(results)}


def write_report(out: Path, report: dict) -> None:
    """``eval.json`` and ``eval.md``, each written atomically."""
    from instructkit.atomic import write_atomic

    write_atomic(Path(out) / REPORT_FILE, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    write_atomic(Path(out) / TABLE_FILE, markdown_table(report))


# task -> (key, label, format) rows of the table
_ROWS = {
    "perplexity": [("ppl", "perplexity", ".4g"), ("loss", "mean token loss", ".4f"),
                   ("tokens", "tokens", "d"), ("examples", "examples", "d")],
    "reward_accuracy": [("accuracy", "accuracy", ".4f"), ("margin", "mean margin", ".4g"),
                        ("n_pairs", "pairs", "d")],
    "samples": [("n", "responses", "d"), ("mean_response_chars", "mean length (chars)", ".1f"),
                ("n_empty", "empty responses", "d")],
    "judge": [("mean_score", "mean score (1-5)", ".3f"), ("n_scored", "scored", "d"),
              ("n_unparseable", "unparseable", "d")],
    "pairwise": [("win_rate", "win rate", ".3f"), ("tie_rate", "tie rate", ".3f"),
                 ("loss_rate", "loss rate", ".3f"), ("n_compared", "compared", "d"),
                 ("n_unparseable", "unparseable", "d"), ("n_order_disagreements", "order disagreements", "d")],
}
_SOURCES = {"perplexity": "data", "reward_accuracy": "data", "samples": "prompts", "judge": "judge",
            "pairwise": "model_b"}


def _fmt(value, spec: str) -> str:
    if value is None:
        return "n/a"
    if spec == "d":
        return str(int(value))
    return format(value, spec)


def markdown_table(report: dict) -> str:
    """The report as Markdown: one row per task and metric."""
    lines = [f"# Evaluation of `{report['model']}`", "", "| task | metric | value | source |",
             "|---|---|---|---|"]
    for task, res in report["results"].items():
        src = str(res.get(_SOURCES.get(task, ""), "") or "")
        for key, label, spec in _ROWS.get(task, []):
            if key in res:
                lines.append(f"| {task} | {label} | {_fmt(res[key], spec)} | {src} |")
                src = ""
    notes = []
    judge = report["results"].get("judge")
    if judge and judge.get("n_unparseable"):
        notes.append(f"{judge['n_unparseable']} of {judge['n_items']} judgements had no readable "
                     "score and are left out of the mean.")
    pw = report["results"].get("pairwise")
    if pw:
        notes.append("Pairwise: each pair judged in both orders; a win needs both orders to agree, "
                     "anything else is a tie.")
        if pw.get("n_missing_b"):
            notes.append(f"{pw['n_missing_b']} prompts had no answer from model B and were skipped.")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"

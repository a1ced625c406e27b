"""`instructkit report`: one self-contained HTML page and a Markdown file for a run.

A run folder is either a pipeline folder with one subfolder per stage (``sft/``, ``rm/``,
``dpo/``, ``ppo/``, ``pretrain/``, ``eval/`` ...) or a single stage folder (it holds
``metrics.jsonl`` itself). For every stage with a ``metrics.jsonl`` the report shows

- one figure with the curves that exist (loss and eval loss, learning rate, reward, KL,
  response length, accuracy, margin, PPO policy/value loss), embedded in ``report.html`` as a
  base64 PNG and saved as ``report_<stage>.png`` next to ``report.md``;
- the last train record and the last eval record as tables;
- sample generations "before and after": the earliest and the latest answer to the same
  prompt from ``samples.jsonl`` (with rewards for PPO), or, where no prompt repeats, the
  first and the last logged samples;

and every ``eval.json`` found (``eval/eval.json``, ``<stage>/eval.json``, ``eval.json``) as a
table. All text read from files is HTML-escaped; the page has inline CSS, no scripts and no
external references. Every file is written to a temporary name and renamed.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from instructkit.atomic import write_atomic

HTML_FILE = "report.html"
MD_FILE = "report.md"

# Stages in pipeline order; other folders follow alphabetically.
STAGE_ORDER = ["pretrain", "sft", "rm", "dpo", "ppo", "grpo"]

# (panel title, [(key, label)]) — a panel is drawn when at least one of its keys has data.
PANELS: list[tuple[str, list[tuple[str, str]]]] = [
    ("loss", [("loss", "train"), ("eval_loss", "eval")]),
    ("learning rate", [("lr", "lr")]),
    ("reward", [("reward_mean", "reward mean"), ("score_mean", "score mean")]),
    ("KL", [("kl", "kl")]),
    ("response length", [("response_len", "tokens")]),
    ("accuracy", [("accuracy", "train"), ("eval_accuracy", "eval")]),
    ("margin", [("margin", "train"), ("eval_margin", "eval")]),
    ("RL losses", [("policy_loss", "policy"), ("value_loss", "value")]),
    ("groups without signal (GRPO)", [("equal_group_share", "share")]),
]

# Keys of the last train record shown in the final-metrics table, in this order.
TRAIN_KEYS = [
    "loss", "lr", "grad_norm", "accuracy", "margin", "chosen_reward", "rejected_reward",
    "reward_mean", "reward_std", "score_mean", "kl", "kl_coef", "entropy", "policy_loss",
    "value_loss", "clipfrac", "approx_kl", "explained_variance", "equal_group_share", "response_len", "no_eos_share",
    "tokens_per_s", "gen_tokens_per_s", "peak_mem_gb", "epoch", "skipped_steps",
]

MAX_SAMPLE_PROMPTS = 6
MAX_TEXT_CHARS = 2000


# ---------------------------------------------------------------------------------------------
# reading


def read_jsonl(path: Path) -> list[dict]:
    """The JSON objects of a JSONL file; blank, cut or malformed lines are skipped."""
    rows: list[dict] = []
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return rows
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            continue  # a line cut by a crash
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


def _num(v) -> float | None:
    """A finite float, or None (bools, strings such as "nan", missing values)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _is_eval(rec: dict) -> bool:
    return any(str(k).startswith("eval_") for k in rec)


def _is_train(rec: dict) -> bool:
    return "event" not in rec and not _is_eval(rec)


@dataclass
class StageFolder:
    name: str
    path: Path
    records: list[dict] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)

    @property
    def train(self) -> list[dict]:
        return [r for r in self.records if _is_train(r)]

    @property
    def evals(self) -> list[dict]:
        return [r for r in self.records if "event" not in r and _is_eval(r)]

    @property
    def finished(self) -> bool:
        return any(r.get("event") == "end" for r in self.records)

    def series(self, key: str) -> tuple[list[float], list[float]]:
        xs, ys = [], []
        for r in self.records:
            if "event" in r:
                continue
            y, x = _num(r.get(key)), _num(r.get("step"))
            if y is not None and x is not None:
                xs.append(x)
                ys.append(y)
        return xs, ys


def _stage_sort_key(name: str):
    return (STAGE_ORDER.index(name) if name in STAGE_ORDER else len(STAGE_ORDER), name)


def find_stages(run_dir: Path, stages: list[str] | None = None) -> list[StageFolder]:
    """The stage folders of ``run_dir`` (or ``run_dir`` itself when it holds metrics.jsonl)."""
    from instructkit.errors import UserError

    if (run_dir / "metrics.jsonl").is_file():
        dirs = [(run_dir.name or "run", run_dir)]
    else:
        found = {p.name: p for p in run_dir.iterdir() if p.is_dir() and (p / "metrics.jsonl").is_file()}
        if stages:
            missing = [s for s in stages if s not in found]
            if missing:
                raise UserError(
                    f"{run_dir}: no stage folder with metrics.jsonl named {', '.join(missing)}; "
                    f"found: {', '.join(sorted(found, key=_stage_sort_key)) or 'none'}")
            dirs = [(s, found[s]) for s in stages]
        else:
            dirs = [(n, found[n]) for n in sorted(found, key=_stage_sort_key)]
    return [StageFolder(n, p, read_jsonl(p / "metrics.jsonl"), read_jsonl(p / "samples.jsonl")) for n, p in dirs]


def find_eval_reports(run_dir: Path) -> list[tuple[Path, dict]]:
    """Every readable eval.json in ``run_dir`` or one level below (eval/ first)."""
    candidates = [run_dir / "eval" / "eval.json", run_dir / "eval.json", *sorted(run_dir.glob("*/eval.json"))]
    out, seen = [], set()
    for p in candidates:
        if p in seen or not p.is_file():
            continue
        seen.add(p)
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("results"), dict):
            out.append((p, data))
    return out


# ---------------------------------------------------------------------------------------------
# formatting


def fmt(v) -> str:
    """A metric value as text: integers as is, floats to 4 significant digits."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v == int(v) and abs(v) < 1e9:
            return str(int(v))
        return format(v, ".4g")
    if v is None:
        return "n/a"
    return str(v)


def _clip(text: str, n: int = MAX_TEXT_CHARS) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n] + " …"


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _md_cell(v) -> str:
    return str(v).replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ").replace("\r", " ")


def _md_block(text: str) -> str:
    """Text in a fenced code block whose fence is longer than any backtick run inside."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name) or "stage"


def final_tables(stage: StageFolder) -> list[tuple[str, list[tuple[str, str]]]]:
    """[(caption, [(metric, value)])] for the last train record and the last eval record."""
    tables = []
    train = stage.train
    if train:
        last = train[-1]
        keys = [k for k in TRAIN_KEYS if k in last]
        keys += [k for k in last if k not in keys and k != "step" and _num(last[k]) is not None
                 and not k.startswith("time_")]
        tables.append((f"last train record (step {fmt(last.get('step'))})", [(k, fmt(last[k])) for k in keys]))
    evals = stage.evals
    if evals:
        last = evals[-1]
        rows = [(k, fmt(v)) for k, v in last.items() if k != "step" and not isinstance(v, (dict, list))]
        tables.append((f"last eval record (step {fmt(last.get('step'))})", rows))
    return tables


def eval_rows(report: dict) -> list[tuple[str, str, str]]:
    """(task, metric, value) for every scalar in eval.json's results."""
    rows = []
    for task, res in report.get("results", {}).items():
        if not isinstance(res, dict):
            continue
        for k, v in res.items():
            if isinstance(v, (dict, list)):
                continue
            rows.append((str(task), str(k), fmt(v)))
    return rows


@dataclass
class SampleView:
    """Before/after pairs for repeated prompts, or the first and last logged samples."""

    pairs: list[tuple[dict, dict]] = field(default_factory=list)
    first: list[dict] = field(default_factory=list)
    last: list[dict] = field(default_factory=list)


def sample_view(samples: list[dict]) -> SampleView:
    rows = [s for s in samples if "prompt" in s and "response" in s]
    if not rows:
        return SampleView()

    def step(s):
        return _num(s.get("step")) or 0.0

    by_prompt: dict[str, list[dict]] = {}
    for s in rows:
        by_prompt.setdefault(str(s["prompt"]), []).append(s)
    pairs = []
    for group in by_prompt.values():
        early = min(group, key=step)  # min/max keep the first/last of equal steps
        late = max(reversed(group), key=step)
        if step(late) > step(early):
            pairs.append((early, late))
    if pairs:
        return SampleView(pairs=pairs[:MAX_SAMPLE_PROMPTS])
    lo, hi = min(step(s) for s in rows), max(step(s) for s in rows)
    first = [s for s in rows if step(s) == lo][:MAX_SAMPLE_PROMPTS]
    last = [s for s in rows if step(s) == hi][:MAX_SAMPLE_PROMPTS] if hi > lo else []
    return SampleView(first=first, last=last)


# ---------------------------------------------------------------------------------------------
# plots


def stage_panels(stage: StageFolder) -> list[tuple[str, list]]:
    """The panels of :data:`PANELS` that have data: (title, [(label, steps, values)])."""
    panels = []
    for title, keys in PANELS:
        lines = [(label, *stage.series(k)) for k, label in keys]
        lines = [(label, xs, ys) for label, xs, ys in lines if ys]
        if lines:
            panels.append((title, lines))
    return panels


def plot_stage(stage: StageFolder) -> bytes | None:
    """One PNG with a subplot per panel that has data; None when nothing can be plotted."""
    panels = stage_panels(stage)
    if not panels:
        return None
    import matplotlib

    matplotlib.use("Agg", force=True)
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend
    from matplotlib.ticker import MaxNLocator

    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig = Figure(figsize=(4.6 * ncols, 3.1 * nrows), dpi=100, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (title, lines) in zip(axes, panels):
        for label, xs, ys in lines:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.4, label=label)
        ax.set_title(title, fontsize=11)
        ax.set_xlabel("step", fontsize=9)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
        if title == "learning rate":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        if len(lines) > 1:
            ax.legend(fontsize=8)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(stage.name, fontsize=13, fontweight="bold")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# writing


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto;
       max-width: 1180px; padding: 0 16px; color: #1d2430; background: #fff; line-height: 1.45; }
h1 { border-bottom: 2px solid #3b6fb6; padding-bottom: 6px; }
h2 { margin-top: 36px; border-bottom: 1px solid #d0d7de; padding-bottom: 4px; }
h3 { margin-top: 22px; color: #3b4a5e; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 14px; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #eef2f7; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
caption { white-space: nowrap; text-align: left; font-weight: 600; padding: 4px 0; color: #3b4a5e; }
img.plot { max-width: 100%; border: 1px solid #d0d7de; }
pre { white-space: pre-wrap; word-wrap: break-word; margin: 0; font-size: 13px;
      font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; }
table.samples { width: 100%; table-layout: fixed; }
.meta { color: #5b6778; font-size: 13px; }
.tag { display: inline-block; padding: 1px 7px; border-radius: 9px; font-size: 12px; }
.ok { background: #dff3e3; color: #1a6b2f; } .warn { background: #fdf0d5; color: #8a5a00; }
.tables { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
"""


def _html_table(rows: list[tuple], header: tuple, caption: str | None = None, num_cols=()) -> str:
    out = ["<table>"]
    if caption:
        out.append(f"<caption>{_esc(caption)}</caption>")
    out.append("<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        cells = "".join(f'<td class="num">{_esc(c)}</td>' if i in num_cols else f"<td>{_esc(c)}</td>"
                        for i, c in enumerate(row))
        out.append(f"<tr>{cells}</tr>")
    out.append("</table>")
    return "\n".join(out)


def _md_table(rows: list[tuple], header: tuple) -> str:
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _sample_label(s: dict) -> str:
    label = f"step {fmt(s.get('step'))}"
    if _num(s.get("reward")) is not None:
        label += f", reward {fmt(float(s['reward']))}"
    return label


def _html_sample(s: dict) -> str:
    return f'<div class="meta">{_esc(_sample_label(s))}</div><pre>{_esc(_clip(s.get("response", "")))}</pre>'


def _html_samples(view: SampleView) -> str:
    if view.pairs:
        out = ['<table class="samples"><tr><th style="width:24%">prompt</th><th>before</th><th>after</th></tr>']
        for a, b in view.pairs:
            out.append(f"<tr><td><pre>{_esc(_clip(a['prompt'], 600))}</pre></td>"
                       f"<td>{_html_sample(a)}</td><td>{_html_sample(b)}</td></tr>")
        out.append("</table>")
        return "\n".join(out)
    out = []
    for title, rows in (("first samples", view.first), ("last samples", view.last)):
        if not rows:
            continue
        out.append(f"<h4>{_esc(title)}</h4>")
        out.append('<table class="samples"><tr><th style="width:30%">prompt</th><th>response</th></tr>')
        for s in rows:
            out.append(f"<tr><td><pre>{_esc(_clip(s['prompt'], 600))}</pre></td><td>{_html_sample(s)}</td></tr>")
        out.append("</table>")
    return "\n".join(out)


def _md_samples(view: SampleView) -> str:
    out = []
    if view.pairs:
        for i, (a, b) in enumerate(view.pairs, 1):
            out += [f"**Prompt {i}**", "", _md_block(_clip(a["prompt"], 600)), "",
                    f"Before ({_sample_label(a)}):", "", _md_block(_clip(a["response"])), "",
                    f"After ({_sample_label(b)}):", "", _md_block(_clip(b["response"])), ""]
        return "\n".join(out)
    for title, rows in (("First samples", view.first), ("Last samples", view.last)):
        if not rows:
            continue
        out += [f"#### {title}", ""]
        for s in rows:
            out += [f"Prompt ({_sample_label(s)}):", "", _md_block(_clip(s["prompt"], 600)), "",
                    "Response:", "", _md_block(_clip(s["response"])), ""]
    return "\n".join(out)


def write_report(run_dir, stages: list[str] | None = None, title: str | None = None) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` (and ``report_<stage>.png``) into ``run_dir``.

    ``stages`` selects stage subfolders of a pipeline folder (default: all with metrics.jsonl).
    Returns the paths of the HTML and the Markdown file.
    """
    from instructkit.errors import UserError

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"{run_dir}: not a folder; give a run folder (with stage subfolders) or a stage folder")
    found = find_stages(run_dir, stages)
    evals = find_eval_reports(run_dir)
    if not found and not evals:
        raise UserError(f"{run_dir}: nothing to report: no metrics.jsonl in it or in a subfolder, and no eval.json")
    title = title or f"instructkit report: {run_dir.resolve().name}"

    h = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
         '<meta name="viewport" content="width=device-width, initial-scale=1">',
         f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>", f"<h1>{_esc(title)}</h1>"]
    m = [f"# {title}", ""]

    for part in (_overview_section(found), *(_stage_section(st, run_dir) for st in found),
                 _eval_section(evals, run_dir)):
        h += part[0]
        m += part[1]

    h.append("</body></html>")
    html_path, md_path = run_dir / HTML_FILE, run_dir / MD_FILE
    write_atomic(html_path, "\n".join(h) + "\n")
    write_atomic(md_path, "\n".join(m).rstrip() + "\n")
    return html_path, md_path


def _overview_section(found: list) -> tuple[list[str], list[str]]:
    """One row a stage: last step, record counts, finished or not (HTML lines, Markdown lines)."""
    overview = []
    for st in found:
        steps = [_num(r.get("step")) for r in st.train]
        steps = [s for s in steps if s is not None]
        overview.append((st.name, fmt(int(max(steps))) if steps else "0", str(len(st.train)), str(len(st.evals)),
                         "finished" if st.finished else "incomplete"))
    if not overview:
        return [], []
    header = ("stage", "last step", "train records", "eval records", "status")
    table = _html_table(overview, header, num_cols=(1, 2, 3)).replace(
        "<td>finished</td>", '<td><span class="tag ok">finished</span></td>').replace(
        "<td>incomplete</td>", '<td><span class="tag warn">incomplete</span></td>')
    return ["<h2>Overview</h2>", table], ["## Overview", "", _md_table(overview, header), ""]


def _stage_section(st, run_dir: Path) -> tuple[list[str], list[str]]:
    """A stage's curves (also written as report_<stage>.png), final metrics, samples, config."""
    anchor = _safe_name(st.name)
    h = [f'<h2 id="{_esc(anchor)}">Stage: {_esc(st.name)}</h2>', f'<div class="meta">{_esc(st.path)}</div>']
    m = [f"## Stage: {st.name}", "", f"`{st.path}`", ""]
    png = plot_stage(st)
    if png is not None:
        png_name = f"report_{anchor}.png"
        write_atomic(run_dir / png_name, png)
        b64 = base64.b64encode(png).decode("ascii")
        h.append(f'<img class="plot" alt="{_esc(st.name)} curves" src="data:image/png;base64,{b64}">')
        m += [f"![{st.name} curves]({png_name})", ""]
    else:
        h.append('<p class="meta">no numeric metrics to plot</p>')
        m += ["No numeric metrics to plot.", ""]

    tables = final_tables(st)
    if tables:
        h += ["<h3>Final metrics</h3>", '<div class="tables">']
        m += ["### Final metrics", ""]
        for caption, rows in tables:
            h.append(_html_table(rows, ("metric", "value"), caption, num_cols=(1,)))
            m += [f"*{caption}*", "", _md_table(rows, ("metric", "value")), ""]
        h.append("</div>")

    view = sample_view(st.samples)
    if view.pairs or view.first:
        sub = "Samples: before and after" if view.pairs else "Samples"
        h += [f"<h3>{sub}</h3>", _html_samples(view)]
        m += [f"### {sub}", "", _md_samples(view), ""]

    cfg = st.path / "config.yaml"
    if cfg.is_file():
        try:
            text = cfg.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        if text:
            h.append(f"<details><summary>config.yaml</summary><pre>{_esc(_clip(text, 20000))}</pre></details>")
    return h, m


def _eval_section(evals: list, run_dir: Path) -> tuple[list[str], list[str]]:
    """Every eval.json found under the run, one table each."""
    if not evals:
        return [], []
    h, m = ["<h2>Evaluation</h2>"], ["## Evaluation", ""]
    for path, rep in evals:
        rows = eval_rows(rep)
        caption = f"{rep.get('model', '')} ({path.relative_to(run_dir)})"
        h.append(_html_table(rows, ("task", "metric", "value"), caption, num_cols=(2,)))
        m += [f"*{_md_cell(caption)}*", "", _md_table(rows, ("task", "metric", "value")), ""]
    return h, m

"""Check that a change to the code left training unchanged: run the shipped tiny configs with the
code of another commit and with the working tree, and compare every logged number step by step.

    python scripts/check_curves.py --against HEAD          # before committing a refactor
    python scripts/check_curves.py --against 3cff73f --keep /tmp/curves

The other commit is checked out with ``git worktree`` into a temporary folder and run with the
same Python (so the same libraries); both runs use the same data files, seeds and CPU. Numbers
(losses, grad norms, rewards, KL, eval metrics) must agree to ``--tol`` (1e-6, relative, with the
same absolute floor); timings, memory and throughput are left out. Exit code 1 lists the first
differences. Runs take a few minutes on two CPU cores: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# keys that measure the machine, not the training
IGNORED = ("time", "tokens_per_s", "peak_mem", "elapsed", "eta", "samples_per_s")

# (name, stage, config, overrides); {sft} is the first run's final/ folder
RUNS = [
    ("sft_full", "sft", "configs/tiny/sft_full.yaml", []),
    ("sft_lora", "sft", "configs/tiny/sft_lora.yaml", []),
    ("rm", "rm", "configs/tiny/rm.yaml", []),
    ("dpo", "dpo", "configs/tiny/dpo.yaml", []),
    ("ppo_separate", "ppo", "configs/tiny/ppo.yaml",
     ["policy.name_or_path={sft}", "ppo.value_name_or_path={sft}"]),
    ("ppo_shared_lora", "ppo", "configs/tiny/ppo.yaml",
     ["policy.name_or_path=tiny-llama", "ppo.value_name_or_path=null", "adapter.kind=lora", "adapter.r=8",
      "adapter.alpha=16", "adapter.dropout=0.0", "train.lr=3e-3", "train.max_steps=10"]),
    ("pretrain", "pretrain", "configs/pretrain_tiny.yaml", ["train.max_steps=30"]),
]


def run_all(code_root: Path, out_root: Path) -> dict[str, list[dict]]:
    """Every run of RUNS with the package found under ``code_root/src``; their metrics."""
    env = {**os.environ, "PYTHONPATH": str(code_root / "src"), "INSTRUCTKIT_CACHE": str(out_root / "cache")}
    curves = {}
    for name, stage, config, overrides in RUNS:
        out = out_root / name
        over = [o.format(sft=out_root / "sft_full" / "final") for o in overrides]
        cmd = [sys.executable, "-m", "instructkit", stage, config, f"output_dir={out}",
               "log.tensorboard=false", "log.progress=false", *over]
        # each tree with its own configs and data, so a change to a shipped file shows too
        proc = subprocess.run(cmd, cwd=code_root, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{name} failed with the code in {code_root}:\n{proc.stderr[-3000:]}")
        curves[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        print(f"  {name}: {len(curves[name])} records", flush=True)
    return curves


def numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not any(i in k for i in IGNORED)}


def differences(old: dict, new: dict, tol: float) -> list[str]:
    out = []
    for name in old:
        a, b = old[name], new.get(name, [])
        if len(a) != len(b):
            out.append(f"{name}: {len(a)} records before, {len(b)} after")
            continue
        for ra, rb in zip(a, b):
            na, nb = numbers(ra), numbers(rb)
            if na.keys() != nb.keys():
                out.append(f"{name} step {ra.get('step')}: keys {sorted(na.keys() ^ nb.keys())} differ")
            for k in na.keys() & nb.keys():
                x, y = na[k], nb[k]
                same = (math.isnan(x) and math.isnan(y)) or abs(x - y) <= tol * max(1.0, abs(x), abs(y))
                if not same:
                    out.append(f"{name} step {ra.get('step')}: {k} {x!r} before, {y!r} after")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--against", default="HEAD", help="the commit whose curves are the reference")
    ap.add_argument("--tol", type=float, default=1e-6)
    ap.add_argument("--keep", help="keep both runs' folders here (default: a temporary folder, removed)")
    args = ap.parse_args()
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="curves-"))
    old_code = root / "code"
    shutil.rmtree(root / "before", ignore_errors=True), shutil.rmtree(root / "after", ignore_errors=True)
    subprocess.run(["git", "worktree", "remove", "--force", str(old_code)], cwd=REPO, capture_output=True)
    subprocess.run(["git", "worktree", "add", "--detach", str(old_code), args.against], cwd=REPO, check=True,
                   capture_output=True)
    try:
        print(f"before ({args.against}):", flush=True)
        before = run_all(old_code, root / "before")
        print("after (working tree):", flush=True)
        after = run_all(REPO, root / "after")
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(old_code)], cwd=REPO, capture_output=True)
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    diffs = differences(before, after, args.tol)
    n = sum(len(c) for c in before.values())
    if diffs:
        print(f"{len(diffs)} differences in {n} records; the first:\n  " + "\n  ".join(diffs[:30]))
        return 1
    print(f"the same: {n} records of {len(before)} runs agree to {args.tol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

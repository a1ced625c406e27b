"""The README's quick start is what CI runs, on an install that carries what it needs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def quick_start_commands() -> list[str]:
    """The commands of the README's quick-start code block (comments dropped)."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_ci_runs_both_quick_start_commands_in_order():
    commands = quick_start_commands()
    assert commands == ["bash scripts/demo.sh", "bash scripts/test.sh"]
    ci = [l.strip() for l in (ROOT / ".ci/run").read_text().splitlines()
          if l.strip() and not l.strip().startswith("#")]
    at = [next(i for i, l in enumerate(ci) if l == c or l.startswith(c + " ")) for c in commands]
    assert at == sorted(at), "CI must run the demo first (on the base install), then the tests"
    assert "set -euo pipefail" in ci  # a failing command fails CI


def test_demo_runs_on_the_base_install():
    """demo.sh installs without extras, so what the demo's model needs is a base dependency."""
    demo = (ROOT / "scripts/demo.sh").read_text()
    assert re.search(r"^bash scripts/setup.sh\s*$", demo, re.M)
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[ ]", d, 1)[0].lower() for d in deps}
    cfg = yaml.safe_load((ROOT / "configs/pipeline_smollm2.yaml").read_text())
    model = cfg["sft"]["model"]["name_or_path"]
    if model.endswith(".gguf"):
        assert "gguf" in names, "the demo reads a .gguf model: gguf must be a base dependency"
    assert not {"torch"} - names

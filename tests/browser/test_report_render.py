"""The report renders in headless Chromium (Debian's `chromium`); skipped when it is absent."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from test_report import make_run  # noqa: E402

from instructkit.report import write_report  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1200, 2000


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(tmp_path):
    run = make_run(tmp_path)
    html_path, _ = write_report(run)
    shot = tmp_path / "shot.png"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           "--no-first-run", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
           f"--screenshot={shot}", f"--window-size={WIDTH},{HEIGHT}", html_path.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HOME": str(tmp_path)})
    assert shot.is_file(), f"no screenshot (rc {proc.returncode}): {proc.stderr[-2000:]}"
    if os.environ.get("INSTRUCTKIT_REPORT_SHOT"):  # keep the screenshot (e.g. as a CI artifact)
        shutil.copy(shot, os.environ["INSTRUCTKIT_REPORT_SHOT"])
    data = shot.read_bytes()
    assert len(data) > 10_000
    assert _png_size(data) == (WIDTH, HEIGHT)
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(shot) as img:
        img = img.convert("RGB")
        assert img.size == (WIDTH, HEIGHT)
        lo_hi = img.getextrema()
        assert any(lo != hi for lo, hi in lo_hi), "blank screenshot"
        assert len(img.getcolors(maxcolors=1 << 20) or range(1 << 20)) > 50  # text and plots, not a flat page

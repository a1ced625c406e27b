"""One run per output folder: a second run into a folder that a live run holds is refused with
a message naming the holder; a stale lock (its process is gone) is taken over."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from instructkit.engine import run as R
from instructkit.errors import UserError

LOCK = ".instructkit.lock"


def hold(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / LOCK).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(),
                                           "started": "2026-12-02T10:00:00"}))


def test_a_folder_held_by_a_live_run_is_refused(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        hold(tmp_path, other.pid)
        with pytest.raises(UserError, match=rf"held by a running run \(pid {other.pid} on {socket.gethostname()}"):
            R.prepare_output_dir(tmp_path, resume=False)
        with pytest.raises(UserError, match="held by a running run"):
            R.prepare_output_dir(tmp_path, resume=True)  # resuming under a live run is no better
    finally:
        other.kill()
        other.wait()


def test_a_stale_lock_is_taken_over(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    hold(tmp_path, gone.pid)
    with caplog.at_level("WARNING"):
        R.prepare_output_dir(tmp_path, resume=False)
    assert f"pid {gone.pid}" in caplog.text and "no longer running" in caplog.text
    import os

    assert json.loads((tmp_path / LOCK).read_text())["pid"] == os.getpid()
    R.release_output_dir(tmp_path)
    assert not (tmp_path / LOCK).exists()


def test_a_lock_from_another_host_is_refused_with_what_to_do(tmp_path):
    hold(tmp_path, 12345, host="gpu-node-7")
    with pytest.raises(UserError, match=r"pid 12345 on gpu-node-7.*delete .*\.instructkit\.lock"):
        R.prepare_output_dir(tmp_path, resume=False)


def test_the_same_process_may_run_again(tmp_path):
    R.prepare_output_dir(tmp_path, resume=False)  # e.g. a pipeline, or resume after an interruption
    R.prepare_output_dir(tmp_path, resume=True)
    R.release_output_dir(tmp_path)


def test_two_cli_runs_into_one_folder(tmp_path):
    """The second of two concurrent `instructkit sft` runs into one folder exits 2 naming the first."""
    import time
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    cmd = [sys.executable, "-m", "instructkit.cli", "sft", str(repo / "configs/tiny/sft_lora.yaml"),
           f"output_dir={tmp_path / 'run'}", f"data.train={repo / 'data/selfinstruct_seed_tasks.jsonl'}",
           "log.tensorboard=false", "model.device=cpu"]
    first = subprocess.Popen(cmd + ["train.max_steps=400", "train.save_every=0", "train.eval_every=0"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "run" / LOCK
        deadline = time.time() + 60
        while not lock.exists() and time.time() < deadline:
            time.sleep(0.2)
        second = subprocess.run(cmd + ["train.max_steps=2"], capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr[-2000:]
        assert f"pid {first.pid}" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()


def test_resume_says_when_there_is_nothing_to_resume(tmp_path, caplog):
    import torch

    from instructkit.engine import distributed as D
    from instructkit.engine.batches import BatchStream
    from instructkit.engine.step import StepGuard

    model = torch.nn.Linear(2, 2)
    with caplog.at_level("WARNING", logger="instructkit.engine"):
        step, _, _ = R.restore(tmp_path, D.Wrapped(model), torch.optim.SGD(model.parameters(), lr=0.1),
                               BatchStream(lambda epoch: [[0]]), StepGuard(3))
    assert step == 0 and "no checkpoint in" in caplog.text and "starting from step 0" in caplog.text

"""Writing results so that a crash never leaves a half-written one that looks complete, and
checking later that a file is still what was written."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable

from instructkit.errors import UserError


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``, replacing an older ``out``: the old one is
    renamed aside first, so at every moment either the old or the new result is complete."""
    tmp, out = Path(tmp), Path(out)
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_atomic(path: str | Path, data: bytes | str) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` through ``<path>.tmp``, fsync and a rename: a
    reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse to replace a folder that holds something unless asked (``overwrite``), and never
    replace one that is not a model folder: the whole folder is swapped for the new result, so
    anything else the user kept there would be lost."""
    out = Path(out)
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"output={out}: exists and is a file; choose another output")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not (out / "config.json").is_file():
        raise UserError(f"output={out}: exists and is not a model folder ({', '.join(entries[:5])}"
                        f"{' ...' if len(entries) > 5 else ''}); choose another output")
    if not overwrite:
        raise UserError(f"output={out}: already holds a model ({len(entries)} files); pass "
                        "--overwrite to replace the whole folder, or choose another output")


@contextlib.contextmanager
def explain_disk_full(folder: Path, what: str, then: Callable[[], str]):
    """A full disk (or quota) while writing ``what`` into ``folder`` becomes one line with the
    folder, the space left there and ``then()`` (what survived and how to go on; asked only
    when the disk is full, after the half-written result is gone)."""
    try:
        yield
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        raise UserError(f"no space left on the disk of {folder} while writing {what} "
                        f"({_free_space(Path(folder))} free there); {then()}") from None


def _free_space(path: Path) -> str:
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown space"
    return f"{free / 2**30:.1f} GiB" if free >= 2**30 else f"{free / 2**20:.0f} MiB"

"""Read raw records from a data file or a ``datasets`` name.

Every reader returns a list of plain dicts. Errors a user can fix are :class:`DataError`
with a short message that names the file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
from pathlib import Path
from typing import Any, Iterator

from instructkit.errors import DataError

#: suffixes (lower case) we read ourselves, longest first
FILE_SUFFIXES = (
    ".jsonl.gz", ".json.gz", ".csv.gz", ".txt.gz",
    ".jsonl", ".json", ".parquet", ".csv", ".txt",
)


def load_records(
    source: str,
    split: str = "train",
    max_examples: int | None = None,
    *,
    config_key: str = "data.train",
) -> list[dict]:
    """Read the records of ``source``: a .json / .jsonl / .jsonl.gz / .parquet / .csv / .txt
    file, or else a ``datasets`` name (or a local dataset folder) loaded with ``split``.

    ``max_examples`` keeps the first N records. ``config_key`` is only used in messages
    ("check data.train").
    """
    if max_examples is not None and max_examples <= 0:
        raise DataError(f"max_examples must be > 0 (got {max_examples})")
    source = str(source)
    path = Path(source).expanduser()
    suffix = _suffix(path.name)
    if path.is_file():
        if suffix is None:
            raise DataError(
                f"{path}: unknown file type; use one of "
                + ", ".join(FILE_SUFFIXES)
                + f" (check {config_key})"
            )
        return _read_file(path, suffix, max_examples)
    if not path.is_dir() and (suffix is not None or source.startswith((".", "/", "~"))):
        raise DataError(f"data file not found: {path} (check {config_key})")
    return _load_dataset(source, split, max_examples, config_key)


def _suffix(name: str) -> str | None:
    low = name.lower()
    for s in FILE_SUFFIXES:
        if low.endswith(s):
            return s
    return None


def _open_text(path: Path) -> io.TextIOBase:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def utf8_error(path: Path, e: UnicodeDecodeError) -> DataError:
    """The error for a file that is not UTF-8, naming the line and the byte in it (a reader's
    offset is into whatever chunk it decoded, and no editor goes to a byte offset)."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            for n, line in enumerate(f, 1):
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError as bad:
                    return DataError(
                        f"{path.name}, line {n}: not UTF-8 text ({bad.reason} at byte {bad.start + 1} "
                        f"of the line); save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 "
                        f"{path.name} > fixed{path.suffix}`")
    except (OSError, EOFError):
        pass
    return DataError(f"{path.name}: not UTF-8 text ({e.reason} at byte {e.start})")


def _read_file(path: Path, suffix: str, max_examples: int | None) -> list[dict]:
    base = suffix[: -len(".gz")] if suffix.endswith(".gz") else suffix
    try:
        if base == ".jsonl":
            records = _read_jsonl(path, max_examples)
        elif base == ".json":
            records = _read_json(path)
        elif base == ".csv":
            records = _read_csv(path, max_examples)
        elif base == ".txt":
            records = _read_txt(path)
        elif base == ".parquet":
            records = _read_parquet(path, max_examples)
        else:  # pragma: no cover - FILE_SUFFIXES and this switch go together
            raise AssertionError(suffix)
    except UnicodeDecodeError as e:
        raise utf8_error(path, e) from None
    except (OSError, EOFError) as e:  # e.g. a truncated .gz
        if isinstance(e, FileNotFoundError):
            raise DataError(f"data file not found: {path}") from None
        raise DataError(f"{path.name}: cannot read the file ({e})") from None
    if max_examples is not None:
        records = records[:max_examples]
    return records


def _json_error(path: Path, e: json.JSONDecodeError, line: int | None = None) -> DataError:
    msg = e.msg
    where = line if line is not None else e.lineno
    return DataError(f"{path.name}, line {where}: not valid JSON ({msg} at column {e.colno})")


def _read_jsonl(path: Path, max_examples: int | None) -> list[dict]:
    out: list[dict] = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _json_error(path, e, lineno) from None
            if not isinstance(obj, dict):
                raise DataError(
                    f"{path.name}, line {lineno}: expected a JSON object per line, "
                    f"got {type(obj).__name__}"
                )
            out.append(obj)
            if max_examples is not None and len(out) >= max_examples:
                break
    return out


def _read_json(path: Path) -> list[dict]:
    with _open_text(path) as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # A ".json" file that is really JSON lines (one object per line) is common.
        if e.msg == "Extra data" and text.lstrip().startswith("{"):
            try:
                return _records_from_lines(path, text)
            except DataError:
                pass
        raise _json_error(path, e) from None
    if isinstance(data, dict):
        lists = [(k, v) for k, v in data.items() if isinstance(v, list)]
        if len(lists) != 1:
            keys = ", ".join(map(str, data)) or "none"
            raise DataError(
                f"{path.name}: expected a list of records, or an object holding exactly one "
                f"list; found an object with keys: {keys}"
            )
        key, data = lists[0]
        where = f"{path.name}, key {key!r}"
    else:
        where = path.name
    if not isinstance(data, list):
        raise DataError(f"{path.name}: expected a list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(
                f"{where}: record {i + 1} is a {type(rec).__name__}, expected an object"
            )
    return data


def _records_from_lines(path: Path, text: str) -> list[dict]:
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise _json_error(path, e, lineno) from None
        if not isinstance(obj, dict):
            raise DataError(f"{path.name}, line {lineno}: expected a JSON object")
        out.append(obj)
    return out


def _read_csv(path: Path, max_examples: int | None) -> list[dict]:
    out: list[dict] = []
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        try:
            for row in reader:
                if None in row:  # more cells than header names
                    raise DataError(
                        f"{path.name}, line {reader.line_num}: more values than the "
                        f"{len(reader.fieldnames or [])} header columns"
                    )
                out.append({k: ("" if v is None else v) for k, v in row.items()})
                if max_examples is not None and len(out) >= max_examples:
                    break
        except csv.Error as e:
            raise DataError(f"{path.name}, line {reader.line_num}: not valid CSV ({e})") from None
    if not out and not (reader.fieldnames or []):
        raise DataError(f"{path.name}: empty CSV file (expected a header line)")
    return out


def _read_txt(path: Path) -> list[dict]:
    """Plain text: one record per paragraph (paragraphs are separated by blank lines)."""
    with _open_text(path) as f:
        text = f.read()
    return [{"text": p} for p in _paragraphs(text)]


def _paragraphs(text: str) -> Iterator[str]:
    lines: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if line.strip():
            lines.append(line.rstrip())
        elif lines:
            yield "\n".join(lines)
            lines = []
    if lines:
        yield "\n".join(lines)


def _read_parquet(path: Path, max_examples: int | None) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        raise DataError(f"{path.name}: reading .parquet needs pyarrow (pip install pyarrow)") from None
    try:
        pf = pq.ParquetFile(path)
        if max_examples is None:
            return pf.read().to_pylist()
        out: list[dict] = []
        for batch in pf.iter_batches(batch_size=min(max_examples, 65536)):
            out.extend(batch.to_pylist())
            if len(out) >= max_examples:
                break
        return out[:max_examples]
    except DataError:
        raise
    except Exception as e:  # pyarrow raises its own error types
        raise DataError(f"{path.name}: not a readable parquet file ({e})") from None


def _load_dataset(source: str, split: str, max_examples: int | None, config_key: str) -> list[dict]:
    try:
        import datasets
    except ImportError:  # pragma: no cover
        raise DataError(
            f"{source!r} is not an existing file, and the datasets package is not installed "
            f"(check {config_key})"
        ) from None
    try:
        ds = datasets.load_dataset(source, split=split)
    except Exception as e:  # network, missing name, bad split ... all mean the same to a user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if len(reason) > 300:
            reason = reason[:300] + "..."
        raise DataError(
            f"{source!r} is neither an existing file nor a loadable dataset "
            f"(split {split!r}): {reason} (check {config_key})"
        ) from None
    if max_examples is not None and max_examples < len(ds):
        ds = ds.select(range(max_examples))
    return [dict(r) for r in ds.to_list()] if hasattr(ds, "to_list") else [dict(r) for r in ds]


def as_text(value: Any) -> str:
    """A field value as text: None -> "", numbers -> str."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value != value:  # NaN from pandas-written files
        return ""
    return str(value)

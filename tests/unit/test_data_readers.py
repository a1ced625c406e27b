"""load_records: every reader, and errors that name the file and the line."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pytest

from instructkit.data import load_records
from instructkit.errors import DataError

REPO = Path(__file__).resolve().parents[2]
RECS = [
    {"instruction": "Say hi", "input": "", "output": "Hi!"},
    {"instruction": "Add", "input": "1 2", "output": "3"},
    {"instruction": "Name a color", "input": "", "output": "Blue"},
]


def write_jsonl(path: Path, recs) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return path


def test_data_jsonl(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", RECS)
    assert load_records(str(p)) == RECS
    assert load_records(str(p), max_examples=2) == RECS[:2]


def test_data_jsonl_skips_blank_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(RECS[0]) + "\n\n  \n" + json.dumps(RECS[1]) + "\n")
    assert load_records(str(p)) == RECS[:2]


def test_data_jsonl_gz(tmp_path):
    p = tmp_path / "d.jsonl.gz"
    with gzip.open(p, "wt", encoding="utf-8") as f:
        for r in RECS:
            f.write(json.dumps(r) + "\n")
    assert load_records(str(p)) == RECS


def test_data_json_list_and_object_holding_one_list(tmp_path):
    a = tmp_path / "a.json"
    a.write_text(json.dumps(RECS))
    assert load_records(str(a)) == RECS
    b = tmp_path / "b.json"
    b.write_text(json.dumps({"version": "1", "data": RECS}))
    assert load_records(str(b), max_examples=1) == RECS[:1]


def test_data_json_that_is_really_json_lines(tmp_path):
    p = tmp_path / "d.json"
    write_jsonl(p, RECS)
    assert load_records(str(p)) == RECS


def test_data_json_object_with_two_lists_is_an_error(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"train": RECS, "test": RECS}))
    with pytest.raises(DataError, match=r"d\.json.*exactly one list.*train, test"):
        load_records(str(p))


def test_data_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(RECS), p)
    assert load_records(str(p)) == RECS
    assert load_records(str(p), max_examples=2) == RECS[:2]


def test_data_csv(tmp_path):
    p = tmp_path / "d.csv"
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(RECS)
    assert load_records(str(p)) == RECS


def test_data_csv_row_with_too_many_cells(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("a,b\n1,2\n3,4,5\n")
    with pytest.raises(DataError, match=r"d\.csv, line 3"):
        load_records(str(p))


def test_data_txt_paragraphs(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text("First Citizen:\nSpeak.\n\n\nAll:\nSpeak, speak.\n  \nEnd.")
    assert load_records(str(p)) == [
        {"text": "First Citizen:\nSpeak."},
        {"text": "All:\nSpeak, speak."},
        {"text": "End."},
    ]


def test_data_malformed_jsonl_line_names_file_and_line(tmp_path):
    lines = [json.dumps(r) for r in RECS * 2] + ['{"instruction": "x" "output": "y"}']
    p = tmp_path / "data.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as e:
        load_records(str(p))
    msg = str(e.value)
    assert msg.startswith("data.jsonl, line 7: not valid JSON (Expecting ','")


def test_data_malformed_json_names_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n {"a": 1},\n {"a": 2,}\n]')
    with pytest.raises(DataError, match=r"d\.json, line 3: not valid JSON"):
        load_records(str(p))


def test_data_jsonl_line_not_an_object(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"a": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: expected a JSON object"):
        load_records(str(p))


def test_data_missing_file_names_path_and_key(tmp_path):
    p = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as e:
        load_records(str(p))
    assert str(p) in str(e.value) and "data.train" in str(e.value)
    with pytest.raises(DataError, match="data.validation"):
        load_records(str(p), config_key="data.validation")


def test_data_unknown_name_is_neither_file_nor_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def boom(*a, **k):
        raise FileNotFoundError("Couldn't find any data file")

    monkeypatch.setattr(datasets, "load_dataset", boom)
    with pytest.raises(DataError, match="neither an existing file nor a loadable dataset"):
        load_records("someone/no-such-dataset")


def test_data_datasets_local_folder(tmp_path):
    pytest.importorskip("datasets")
    d = tmp_path / "ds"
    d.mkdir()
    write_jsonl(d / "train.jsonl", RECS)
    assert load_records(str(d), split="train") == RECS
    assert load_records(str(d), split="train", max_examples=1) == RECS[:1]


def test_data_shipped_files_read():
    data = REPO / "data"
    if not data.is_dir():
        pytest.skip("no data/ folder")
    assert len(load_records(str(data / "selfinstruct_seed_tasks.jsonl"))) == 175
    assert len(load_records(str(data / "oasst_en100_trees.jsonl"))) == 100
    assert len(load_records(str(data / "hh_rlhf_harmless_sample.jsonl"))) == 200
    text = load_records(str(data / "tinyshakespeare_small.txt"))
    assert len(text) > 100 and text[0]["text"].startswith("First Citizen:")
    for name in ("LICENSE.self-instruct", "LICENSE.oasst", "LICENSE.hh-rlhf", "README.md"):
        assert (data / name).is_file()


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.json", "d.csv", "d.txt"])
def test_data_not_utf8_names_the_line(tmp_path, name):
    """A Latin-1 byte on line 3: the error names the file, the line and the byte in it (it
    gave a byte offset only, into whatever chunk the reader had decoded)."""
    if name.startswith("d.csv"):
        body = b'instruction,output\n"Say hi",Hi\n"Caf\xe9",Coffee\n'
    elif name.startswith("d.txt"):
        body = b"first paragraph\n\nsecond\ncaf\xe9 au lait\n"
    elif name == "d.json":
        body = b'[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": "d"},\n {"instruction": "caf\xe9", "output": "e"}]\n'
    else:
        body = b"".join(json.dumps(r).encode() + b"\n" for r in RECS[:2]) + b'{"instruction": "caf\xe9", "output": "x"}\n'
    path = tmp_path / name
    path.write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
    with pytest.raises(DataError, match=rf"{name}, line [34]: not UTF-8 text \(invalid continuation byte at byte \d+ of the line\); save the file as UTF-8"):
        load_records(str(path))


def test_corpus_not_utf8_names_the_line(tmp_path):
    from instructkit.data.corpus import read_documents

    (tmp_path / "a.txt").write_bytes(b"one\ntwo\n\xff\xfe three\n")
    with pytest.raises(DataError, match=r"a.txt, line 3: not UTF-8"):
        read_documents([tmp_path / "a.txt"])

"""build_sft_data: stats, deterministic validation split, validation / golden files, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructkit.config import DataConfig
from instructkit.data import SFTData, build_sft_data, split_indices
from instructkit.errors import DataError

try:
    from conftest_data import CHATML, make_tokenizer
except ImportError:  # tests/unit became a package
    from .conftest_data import CHATML, make_tokenizer

REPO = Path(__file__).resolve().parents[2]


def alpaca_file(path: Path, n: int, long: bool = False, empty: int = 0) -> str:
    recs = []
    for i in range(n):
        instr = f"Give three tips for staying healthy, number {i}." + (" Please explain." * 20 if long else "")
        recs.append({"instruction": instr, "input": "", "output": "" if i < empty else f"Eat well {i}."})
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return str(path)


def test_data_build_stats_and_split(tmp_path):
    tok = make_tokenizer(CHATML)
    cfg = DataConfig(train=alpaca_file(tmp_path / "a.jsonl", 40, empty=3), val_fraction=0.1)
    d = build_sft_data(cfg, tok, seed=1)
    assert isinstance(d, SFTData) and d.format == "alpaca" and d.template == "chat"
    s = d.stats
    assert s["n_records"] == 40 and s["n_dropped_empty"] == 3 and s["n_examples"] == 37
    assert s["n_val"] == 4 and s["n_train"] == 33 and len(d.train) == 33 and len(d.val) == 4
    assert s["n_truncated"] == 0 and d.golden == []
    for e in d.train + d.val:
        assert len(e["input_ids"]) == len(e["labels"])
        assert e["labels"][-2] == tok.convert_tokens_to_ids("<|im_end|>")


def test_data_split_deterministic(tmp_path):
    tok = make_tokenizer(CHATML)
    cfg = DataConfig(train=alpaca_file(tmp_path / "a.jsonl", 50), val_fraction=0.2)
    a = build_sft_data(cfg, tok, seed=7)
    b = build_sft_data(cfg, tok, seed=7)
    c = build_sft_data(cfg, tok, seed=8)
    assert a.val == b.val and a.train == b.train
    assert a.val != c.val
    assert split_indices(50, 0.2, 500, 7) == split_indices(50, 0.2, 500, 7)


def test_data_split_rules():
    assert split_indices(1000, 0.5, 30, 0)[1].__len__() == 30  # capped at val_max
    assert len(split_indices(10, 0.01, 500, 0)[1]) == 1  # at least one
    assert len(split_indices(2, 0.9, 500, 0)[1]) == 1  # leaves one for training
    assert split_indices(1, 0.5, 500, 0) == ([0], [])
    assert split_indices(10, 0.0, 500, 0) == (list(range(10)), [])
    tr, va = split_indices(100, 0.1, 500, 3)
    assert sorted(tr + va) == list(range(100)) and not set(tr) & set(va)


def test_data_validation_and_golden_files(tmp_path):
    tok = make_tokenizer(CHATML)
    cfg = DataConfig(
        train=alpaca_file(tmp_path / "a.jsonl", 20),
        validation=alpaca_file(tmp_path / "v.jsonl", 5),
        golden=alpaca_file(tmp_path / "g.jsonl", 3),
    )
    d = build_sft_data(cfg, tok, seed=0)
    assert len(d.train) == 20 and len(d.val) == 5 and len(d.golden) == 3
    assert d.stats["n_golden"] == 3


def test_data_truncation_counted_and_too_long_dropped(tmp_path):
    tok = make_tokenizer(CHATML)
    recs = [{"instruction": "Hi", "output": "Eat well. " * 30}] * 3 + [
        {"instruction": "Hi " * 200, "output": "ok"}] * 2
    p = tmp_path / "t.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    d = build_sft_data(DataConfig(train=str(p), max_seq_len=64, val_fraction=0.0), tok, seed=0)
    assert d.stats["n_truncated"] == 3 and d.stats["n_dropped_too_long"] == 2
    assert all(len(e["input_ids"]) == 64 for e in d.train)


def test_data_all_too_long_is_an_error_that_says_why(tmp_path):
    tok = make_tokenizer(CHATML)
    cfg = DataConfig(train=alpaca_file(tmp_path / "a.jsonl", 12, long=True), max_seq_len=32)
    with pytest.raises(DataError) as e:
        build_sft_data(cfg, tok, seed=0)
    msg = str(e.value)
    assert "all 12 examples were longer than max_seq_len=32 with no answer token left" in msg
    assert "raise data.max_seq_len" in msg


def test_data_all_empty_answers_is_an_error(tmp_path):
    tok = make_tokenizer(CHATML)
    cfg = DataConfig(train=alpaca_file(tmp_path / "a.jsonl", 4, empty=4))
    with pytest.raises(DataError, match="4 of 4 records gave an empty answer"):
        build_sft_data(cfg, tok, seed=0)


def test_data_missing_train_file(tmp_path):
    tok = make_tokenizer(CHATML)
    with pytest.raises(DataError, match="check data.train"):
        build_sft_data(DataConfig(train=str(tmp_path / "none.jsonl")), tok, seed=0)


def test_data_text_file_and_alpaca_template(tmp_path):
    tok = make_tokenizer(None)
    p = tmp_path / "t.txt"
    p.write_text("First Citizen:\nSpeak.\n\nAll:\nSpeak, speak.\n")
    d = build_sft_data(DataConfig(train=str(p), val_fraction=0.0), tok, seed=0)
    assert d.format == "text" and len(d.train) == 2
    assert all(e["labels"] == e["input_ids"] and e["input_ids"][-1] == tok.eos_token_id for e in d.train)


def test_data_shipped_files_build():
    data = REPO / "data"
    if not data.is_dir():
        pytest.skip("no data/ folder")
    tok = make_tokenizer(CHATML)
    for name, fmt in (("selfinstruct_seed_tasks.jsonl", "self_instruct"),
                      ("oasst_en100_trees.jsonl", "oasst"), ("tinyshakespeare_small.txt", "text")):
        d = build_sft_data(DataConfig(train=str(data / name), max_seq_len=256, max_examples=60), tok, seed=0)
        assert d.format == fmt and d.stats["n_train"] > 0 and d.stats["n_val"] >= 1


def test_data_batched_tokenization_equals_one_at_a_time(tmp_path):
    """3000 examples go through the batched tokenizer path; each equals the example tokenized
    alone (its speed is measured in bench/, not here)."""
    tok = make_tokenizer(CHATML)
    cfg = DataConfig(train=alpaca_file(tmp_path / "a.jsonl", 3000), val_fraction=0.0)
    d = build_sft_data(cfg, tok, seed=0)
    assert d.stats["n_examples"] == 3000
    small = build_sft_data(DataConfig(train=alpaca_file(tmp_path / "b.jsonl", 3), val_fraction=0.0), tok, seed=0)
    first = {tuple(e["input_ids"]): e["labels"] for e in d.train}
    for e in small.train:  # the same three records lead the big file
        assert first[tuple(e["input_ids"])] == e["labels"]

"""The memory-mapped pretraining corpus: exact token counts, reuse, staleness, parallel build,
windows and batch plans; the trained tokenizer."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from instructkit.data.corpus import (
    BIN_FILE,
    META_FILE,
    build_corpus,
    read_documents,
    resolve_sources,
    train_tokenizer,
)
from instructkit.errors import DataError
from instructkit.models.tiny import tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]
SHAKESPEARE = REPO / "data" / "tinyshakespeare_small.txt"

DOCS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.",
    "All:\nSpeak, speak.",
    "First Citizen:\nYou are all resolved rather to die than to famish?",
    "All:\nResolved. resolved.",
    "Menenius:\nWhy, masters, my good friends, mine honest neighbours,\nWill you undo yourselves?",
]


@pytest.fixture
def tok():
    return tiny_tokenizer()


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.txt").write_text("\n\n".join(DOCS[:3]) + "\n")
    (folder / "b.txt").write_text("\n\n\n".join(DOCS[3:]) + "\n")
    (folder / "ignored.md").write_text("not a .txt file")
    return folder


def test_documents_split_on_blank_lines_and_per_file(tmp_path):
    folder = write_corpus(tmp_path / "src")
    paths = resolve_sources(folder)
    assert [p.name for p in paths] == ["a.txt", "b.txt"]
    assert read_documents(paths) == DOCS
    assert len(read_documents(paths, split="file")) == 2
    assert resolve_sources(str(folder / "*.txt")) == paths
    assert resolve_sources([folder / "b.txt", str(folder / "a.txt"), folder]) == paths
    with pytest.raises(DataError, match="no such file"):
        resolve_sources(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="matches no files"):
        resolve_sources(str(tmp_path / "*.nothing"))


def test_exact_token_count_is_documents_plus_eos(tmp_path, tok):
    corpus = build_corpus(write_corpus(tmp_path / "src"), tok, tmp_path / "cache", num_workers=1)
    expected = []
    for doc in DOCS:
        expected += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert corpus.n_tokens == len(expected)
    assert corpus.n_documents == len(DOCS)
    assert corpus.array.tolist() == expected
    assert isinstance(corpus.array, np.memmap) and not corpus.array.flags.writeable
    assert corpus.array.dtype == np.uint16  # a 1024-token vocabulary
    meta = json.loads((tmp_path / "cache" / META_FILE).read_text())
    assert meta["n_tokens"] == len(expected) and meta["dtype"] == "uint16"
    assert (tmp_path / "cache" / BIN_FILE).stat().st_size == 2 * len(expected)


def test_shipped_corpus_count_matches_per_document_sum(tmp_path, tok):
    corpus = build_corpus(SHAKESPEARE, tok, tmp_path / "cache", num_workers=1)
    docs = read_documents([SHAKESPEARE])
    lengths = [len(x) for x in tok(docs, add_special_tokens=False)["input_ids"]]
    assert corpus.n_tokens == sum(lengths) + len(docs)
    assert int((np.asarray(corpus.array) == tok.eos_token_id).sum()) == len(docs)


def test_reused_when_unchanged(tmp_path, tok):
    src = write_corpus(tmp_path / "src")
    first = build_corpus(src, tok, tmp_path / "cache")
    assert first.rebuilt
    mtime = (tmp_path / "cache" / BIN_FILE).stat().st_mtime_ns
    second = build_corpus(src, tok, tmp_path / "cache")
    assert not second.rebuilt
    assert (tmp_path / "cache" / BIN_FILE).stat().st_mtime_ns == mtime
    assert np.array_equal(first.array, second.array)


def test_stale_when_the_source_changes(tmp_path, tok):
    src = write_corpus(tmp_path / "src")
    first = build_corpus(src, tok, tmp_path / "cache")
    (src / "b.txt").write_text((src / "b.txt").read_text() + "\nCoriolanus:\nHence, rotten thing!\n")
    second = build_corpus(src, tok, tmp_path / "cache")
    assert second.rebuilt
    assert second.n_documents == first.n_documents + 1
    assert second.n_tokens > first.n_tokens
    # a new file in the folder is a change too
    (src / "c.txt").write_text("Volumnia:\nO, peace!\n")
    assert build_corpus(src, tok, tmp_path / "cache").rebuilt
    # same bytes, touched: the fingerprint includes the mtime
    st = (src / "c.txt").stat()
    os.utime(src / "c.txt", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert build_corpus(src, tok, tmp_path / "cache").rebuilt
    assert not build_corpus(src, tok, tmp_path / "cache").rebuilt


def test_stale_when_the_tokenizer_changes(tmp_path, tok):
    src = write_corpus(tmp_path / "src")
    first = build_corpus(src, tok, tmp_path / "cache")
    other = tiny_tokenizer()
    other.add_tokens(["Citizen"])  # encodes differently
    second = build_corpus(src, other, tmp_path / "cache")
    assert second.rebuilt
    expected = sum(len(other(d, add_special_tokens=False)["input_ids"]) + 1 for d in DOCS)
    assert second.n_tokens == expected != first.n_tokens
    assert other.convert_tokens_to_ids("Citizen") in second.array.tolist()
    # and back: the cache now holds the other tokenizer's ids
    assert build_corpus(src, tok, tmp_path / "cache").rebuilt


def test_truncated_cache_is_rebuilt(tmp_path, tok):
    src = write_corpus(tmp_path / "src")
    first = build_corpus(src, tok, tmp_path / "cache")
    bin_path = tmp_path / "cache" / BIN_FILE
    bin_path.write_bytes(bin_path.read_bytes()[:10])
    again = build_corpus(src, tok, tmp_path / "cache")
    assert again.rebuilt and again.n_tokens == first.n_tokens
    assert not list((tmp_path / "cache").glob("*.tmp*"))


def test_parallel_build_equals_serial_byte_for_byte(tmp_path, tok):
    serial = build_corpus(SHAKESPEARE, tok, tmp_path / "serial", num_workers=1)
    parallel = build_corpus(SHAKESPEARE, tok, tmp_path / "parallel", num_workers=3)
    a = (tmp_path / "serial" / BIN_FILE).read_bytes()
    b = (tmp_path / "parallel" / BIN_FILE).read_bytes()
    assert a == b and serial.n_tokens == parallel.n_tokens


def test_windows_plan_and_collate(tmp_path, tok):
    corpus = build_corpus(SHAKESPEARE, tok, tmp_path / "cache")
    L = 64
    n = corpus.windows(L)
    assert n == (corpus.n_tokens - 1) // L
    train, val = corpus.split(L, val_fraction=0.1)
    assert len(val) == round(n * 0.1) and len(train) + len(val) == n
    assert val == [i * L for i in range(len(train), n)]  # the last windows
    plan = corpus.plan(L, 8, seed=3, epoch=0, val_fraction=0.1)
    flat = [s for mb in plan for s in mb]
    assert sorted(flat) == train  # every training window exactly once
    assert all(len(mb) == 8 for mb in plan[:-1])
    assert plan == corpus.plan(L, 8, seed=3, epoch=0, val_fraction=0.1)  # deterministic
    assert plan != corpus.plan(L, 8, seed=3, epoch=1, val_fraction=0.1)  # reshuffled per epoch
    assert plan != corpus.plan(L, 8, seed=4, epoch=0, val_fraction=0.1)
    assert [s for mb in corpus.eval_plan(L, 8, 0.1) for s in mb] == val

    batch = corpus.collate(plan[0][:3], L)
    assert batch["attention_mask"] is None
    for key in ("input_ids", "target_ids", "position_ids"):
        assert batch[key].shape == (3, L) and batch[key].dtype == torch.long
    arr = np.asarray(corpus.array, dtype=np.int64)
    s = plan[0][1]
    assert batch["input_ids"][1].tolist() == arr[s:s + L].tolist()
    assert batch["target_ids"][1].tolist() == arr[s + 1:s + L + 1].tolist()  # next token
    assert batch["position_ids"][2].tolist() == list(range(L))
    # the targets of consecutive windows tile the corpus: every token but the first, once
    targets = torch.cat([corpus.collate([i * L], L)["target_ids"][0] for i in range(n)])
    assert targets.tolist() == arr[1:n * L + 1].tolist()


def test_collate_feeds_the_lm_loss(tmp_path, tok):
    from instructkit.engine.lm import evaluate_lm
    from instructkit.models.tiny import build_tiny_model

    corpus = build_corpus(SHAKESPEARE, tok, tmp_path / "cache")
    model = build_tiny_model("tiny-llama", seed=0)
    batches = [corpus.collate(mb, 32) for mb in corpus.eval_plan(32, 4, 0.05)[:2]]
    r = evaluate_lm(model, batches, torch.device("cpu"), "fp32", chunk_size=0)
    chunked = evaluate_lm(model, batches, torch.device("cpu"), "fp32", chunk_size=64)
    assert r["tokens"] == 8 * 32
    assert r["loss"] == pytest.approx(chunked["loss"], abs=1e-5)
    assert 6.0 < r["loss"] < 7.5  # about log(1024) at random init


def test_train_tokenizer_and_reuse(tmp_path):
    out = tmp_path / "tok"
    tok = train_tokenizer(SHAKESPEARE, 400, out)
    assert len(tok) == 400
    assert tok.eos_token == "<|end_of_text|>" and tok.bos_token == "<|begin_of_text|>"
    assert tok.pad_token == "<|pad|>"
    assert len({tok.eos_token_id, tok.bos_token_id, tok.pad_token_id}) == 3
    text = "First Citizen:\nWe are accounted poor citizens, the patricians good. é ✓"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text  # byte-level: lossless
    assert (out / "tokenizer.json").is_file()
    mtime = (out / "tokenizer.json").stat().st_mtime_ns
    again = train_tokenizer(SHAKESPEARE, 400, out)
    assert (out / "tokenizer.json").stat().st_mtime_ns == mtime  # reused
    assert again.get_vocab() == tok.get_vocab()
    bigger = train_tokenizer(SHAKESPEARE, 500, out)  # another size: retrained
    assert len(bigger) == 500
    # a corpus with the trained tokenizer
    corpus = build_corpus(SHAKESPEARE, bigger, tmp_path / "cache")
    assert int(np.asarray(corpus.array).max()) < 500

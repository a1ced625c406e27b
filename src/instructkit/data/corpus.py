"""Plain-text corpora for pretraining: tokenized once into a memory-mapped array of token ids.

``build_corpus`` reads text files, splits them into documents (at blank lines, or one per
file), tokenizes the documents in parallel, appends EOS after each and writes one flat array
of token ids (``uint16`` when the vocabulary fits, else ``uint32``) plus ``meta.json``. The
array is reused on later runs while its fingerprint (the sources' paths, sizes, mtimes and
content hashes, the tokenizer's JSON serialisation, the splitting rule) matches, and rebuilt
when it is stale. Both files are written to a temporary name and renamed.

Training reads the array in windows: window ``i`` starts at token ``i * seq_len`` and holds
``seq_len + 1`` tokens, the inputs and (shifted by one) the targets, so consecutive windows
share one boundary token and every token after the first is a target exactly once. The last
``val_fraction`` of the windows are the validation split.

``train_tokenizer`` trains a byte-level BPE tokenizer (``tokenizers``) on the same files.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from instructkit.atomic import sha256_file
from instructkit.data.readers import utf8_error
from instructkit.errors import DataError

log = logging.getLogger("instructkit.data")

FORMAT_VERSION = 1
BIN_FILE = "tokens.bin"
META_FILE = "meta.json"
TOKENIZER_FINGERPRINT_FILE = "instructkit_tokenizer.json"

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
# ChatML markers, so a model pretrained with a trained tokenizer can be fine-tuned with the
# chat template like the shipped tiny tokenizer.
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


# --------------------------------------------------------------------------- sources


def resolve_sources(source_paths: str | os.PathLike | Sequence) -> list[Path]:
    """The text files named by ``source_paths``: files, folders (their ``*.txt``, recursively)
    or glob patterns; sorted, without duplicates. A name that matches nothing is a DataError."""
    if isinstance(source_paths, (str, os.PathLike)):
        source_paths = [source_paths]
    found: list[Path] = []
    for item in source_paths:
        p = Path(item).expanduser()
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            txt = sorted(q for q in p.rglob("*.txt") if q.is_file())
            if not txt:
                raise DataError(f"data.train: the folder {p} holds no .txt files")
            found.extend(txt)
        elif glob.has_magic(str(p)):
            matches = sorted(Path(m) for m in glob.glob(str(p), recursive=True) if Path(m).is_file())
            if not matches:
                raise DataError(f"data.train: the pattern {item!r} matches no files")
            found.extend(matches)
        else:
            raise DataError(f"data.train: {item!r}: no such file or folder")
    out, seen = [], set()
    for p in found:
        r = p.resolve()
        if r not in seen:
            seen.add(r)
            out.append(r)
    return sorted(out)


def read_documents(paths: Iterable[Path], split: str = "blank_lines") -> list[str]:
    """The documents of ``paths`` in order: paragraphs separated by blank lines
    (``split="blank_lines"``) or whole files (``split="file"``); empty ones are dropped."""
    docs: list[str] = []
    for p in paths:
        try:
            text = Path(p).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise utf8_error(Path(p), e) from None
        text = text.replace("\r\n", "\n")
        parts = [text] if split == "file" else _BLANK_LINES.split(text)
        docs.extend(d.strip("\n") for d in parts if d.strip())
    return docs


def sources_fingerprint(paths: Sequence[Path]) -> list[dict]:
    out = []
    for p in paths:
        st = p.stat()
        out.append({"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                    "sha256": sha256_file(p)})
    return out


def tokenizer_json(tokenizer) -> str:
    """A serialisation of the tokenizer that changes whenever its encoding can change."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    # a slow tokenizer: its class, vocabulary and special tokens
    return json.dumps({"class": type(tokenizer).__name__, "vocab": tokenizer.get_vocab(),
                       "special": tokenizer.special_tokens_map}, sort_keys=True, default=str)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


# --------------------------------------------------------------------------- tokenizing


def _encode_chunk(args: tuple[str, list[str], int]) -> np.ndarray:
    """Tokenize one chunk of documents (in a worker process): ids of each document + EOS."""
    from tokenizers import Tokenizer

    tok_json, docs, eos = args
    tok = Tokenizer.from_str(tok_json)
    encs = tok.encode_batch(docs, add_special_tokens=False)
    parts = []
    for e in encs:
        parts.append(np.asarray(e.ids, dtype=np.int64))
        parts.append(np.asarray([eos], dtype=np.int64))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def _chunks(docs: list[str], n: int) -> list[list[str]]:
    size = max(1, -(-len(docs) // n))
    return [docs[i:i + size] for i in range(0, len(docs), size)]


def _mp_context():
    import multiprocessing as mp

    # fork is cheap and the workers only run the Rust tokenizer; elsewhere the platform default
    if sys.platform.startswith("linux"):
        return mp.get_context("fork")
    return mp.get_context("spawn")


def tokenize_documents(docs: list[str], tokenizer, num_workers: int = 1) -> np.ndarray:
    """All documents' token ids, each followed by EOS, as one int64 array (in order)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token: pretraining appends EOS after each document")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: serial
        parts = []
        for d in docs:
            parts.append(np.asarray(tokenizer.encode(d, add_special_tokens=False), dtype=np.int64))
            parts.append(np.asarray([eos], dtype=np.int64))
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    tok_json = backend.to_str()
    if num_workers <= 1 or len(docs) < 2:
        arrays = [_encode_chunk((tok_json, chunk, eos)) for chunk in _chunks(docs, 1)]
    else:
        chunks = _chunks(docs, num_workers * 4)
        with ProcessPoolExecutor(max_workers=num_workers, mp_context=_mp_context()) as ex:
            arrays = list(ex.map(_encode_chunk, [(tok_json, c, eos) for c in chunks]))
    return np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.int64)


# --------------------------------------------------------------------------- corpus


@dataclass
class Corpus:
    """A tokenized corpus: ``array`` (a read-only memmap of token ids) and its batch plans."""

    path: Path  # the .bin file
    meta: dict
    rebuilt: bool = False  # this call tokenized (False: the cached array was reused)
    array: np.ndarray = field(init=False, repr=False)

    def __post_init__(self):
        n = int(self.meta["n_tokens"])
        dtype = np.dtype(self.meta["dtype"])
        if n == 0:
            self.array = np.zeros(0, dtype=dtype)
        else:
            self.array = np.memmap(self.path, dtype=dtype, mode="r", shape=(n,))

    @property
    def n_tokens(self) -> int:
        return int(self.meta["n_tokens"])

    @property
    def n_documents(self) -> int:
        return int(self.meta["n_documents"])

    def windows(self, seq_len: int) -> int:
        """How many windows of ``seq_len`` inputs (+1 target token) the corpus holds."""
        return max(0, (self.n_tokens - 1) // seq_len)

    def split(self, seq_len: int, val_fraction: float = 0.0) -> tuple[list[int], list[int]]:
        """Start offsets of the training and the validation windows (the last
        ``val_fraction`` of them, at least one when the fraction is > 0 and there are two)."""
        n = self.windows(seq_len)
        n_val = int(round(n * val_fraction))
        if val_fraction > 0 and n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        starts = [i * seq_len for i in range(n)]
        return starts[: n - n_val], starts[n - n_val:]

    def plan(self, seq_len: int, micro_batch_size: int, seed: int, epoch: int,
             val_fraction: float = 0.0) -> list[list[int]]:
        """One epoch of training micro-batches (lists of window starts): every training window
        once, in an order that is a pure function of (seed, epoch)."""
        train, _ = self.split(seq_len, val_fraction)
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(len(train))
        shuffled = [train[i] for i in order]
        return [shuffled[i:i + micro_batch_size] for i in range(0, len(shuffled), micro_batch_size)]

    def eval_plan(self, seq_len: int, micro_batch_size: int, val_fraction: float) -> list[list[int]]:
        """The validation windows in order, in micro-batches."""
        _, val = self.split(seq_len, val_fraction)
        return [val[i:i + micro_batch_size] for i in range(0, len(val), micro_batch_size)]

    def collate(self, starts: Sequence[int], seq_len: int) -> dict:
        """Tensors for ``instructkit.engine.lm``: ``input_ids``, ``target_ids`` (the next
        token, already shifted), ``position_ids`` [B, L] and ``attention_mask`` None (every
        row is full: plain causal attention)."""
        import torch

        rows = np.stack([np.asarray(self.array[s:s + seq_len + 1], dtype=np.int64) for s in starts])
        if rows.shape[1] != seq_len + 1:
            raise ValueError(f"a window starting at {max(starts)} runs past the corpus end")
        ids = torch.from_numpy(rows)
        return {
            "input_ids": ids[:, :-1].contiguous(),
            "target_ids": ids[:, 1:].contiguous(),
            "position_ids": torch.arange(seq_len).unsqueeze(0).expand(len(starts), -1).contiguous(),
            "attention_mask": None,
        }


def corpus_fingerprint(paths: Sequence[Path], tokenizer, split: str) -> str:
    h = hashlib.sha256()
    payload = {
        "format": FORMAT_VERSION,
        "split": split,
        "sources": sources_fingerprint(paths),
        "eos": tokenizer.eos_token_id,
        "vocab": len(tokenizer),
    }
    h.update(json.dumps(payload, sort_keys=True).encode())
    h.update(b"\0")
    h.update(tokenizer_json(tokenizer).encode())
    return h.hexdigest()


def _read_meta(cache: Path) -> dict | None:
    try:
        meta = json.loads((cache / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    bin_path = cache / BIN_FILE
    if not bin_path.is_file():
        return None
    if bin_path.stat().st_size != int(meta.get("n_tokens", -1)) * np.dtype(meta.get("dtype", "uint8")).itemsize:
        return None  # truncated or foreign
    return meta


def build_corpus(source_paths, tokenizer, cache_dir, num_workers: int = 1,
                 split: str = "blank_lines") -> Corpus:
    """Tokenize ``source_paths`` (a file, a folder of .txt files, a glob, or a list of those)
    into ``cache_dir/tokens.bin`` + ``meta.json``, or reuse them when the fingerprint matches."""
    if split not in ("blank_lines", "file"):
        raise ValueError(f"split must be 'blank_lines' or 'file', got {split!r}")
    paths = resolve_sources(source_paths)
    cache = Path(cache_dir).expanduser()
    fingerprint = corpus_fingerprint(paths, tokenizer, split)
    meta = _read_meta(cache)
    if meta is not None and meta.get("fingerprint") == fingerprint:
        log.info("corpus: reusing %s (%d tokens)", cache / BIN_FILE, meta["n_tokens"])
        return Corpus(cache / BIN_FILE, meta, rebuilt=False)

    docs = read_documents(paths, split)
    if not docs:
        raise DataError(f"data.train: {', '.join(map(str, paths))} holds no text")
    ids = tokenize_documents(docs, tokenizer, num_workers)
    dtype = token_dtype(len(tokenizer))
    if ids.size and int(ids.max()) >= np.iinfo(dtype).max + 1:
        raise DataError(f"token id {int(ids.max())} does not fit {dtype}")  # pragma: no cover
    cache.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": FORMAT_VERSION,
        "n_tokens": int(ids.size),
        "n_documents": len(docs),
        "dtype": dtype.name,
        "fingerprint": fingerprint,
        "eos_token_id": tokenizer.eos_token_id,
        "vocab_size": len(tokenizer),
        "split": split,
        "sources": [str(p) for p in paths],
    }
    # Atomic: the .bin first, then the meta that vouches for it (a crash leaves a stale meta
    # or none, both of which trigger a rebuild).
    (cache / META_FILE).unlink(missing_ok=True)
    tmp_bin = cache / (BIN_FILE + f".tmp{os.getpid()}")
    with open(tmp_bin, "wb") as f:
        f.write(ids.astype(dtype).tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp_bin, cache / BIN_FILE)
    tmp_meta = cache / (META_FILE + f".tmp{os.getpid()}")
    tmp_meta.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp_meta, cache / META_FILE)
    log.info("corpus: %d documents -> %d tokens in %s", len(docs), ids.size, cache / BIN_FILE)
    return Corpus(cache / BIN_FILE, meta, rebuilt=True)


# --------------------------------------------------------------------------- tokenizer


def _tokenizer_fingerprint(paths: Sequence[Path], vocab_size: int, split: str) -> str:
    payload = {"format": FORMAT_VERSION, "kind": "byte_level_bpe", "vocab_size": vocab_size,
               "split": split, "sources": sources_fingerprint(paths)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _as_fast(tokenizer_object):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer_object, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN, additional_special_tokens=list(CHAT_TOKENS),
        model_max_length=1_000_000, padding_side="right", clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHATML_TEMPLATE
    return tok


def train_tokenizer(source_paths, vocab_size: int, out_dir, split: str = "blank_lines"):
    """A byte-level BPE tokenizer of ``vocab_size`` tokens trained on ``source_paths``, with
    ``<|begin_of_text|>`` (BOS), ``<|end_of_text|>`` (EOS), ``<|pad|>`` and the ChatML markers;
    saved to ``out_dir`` and reused from there while the sources and size are unchanged."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    paths = resolve_sources(source_paths)
    out = Path(out_dir).expanduser()
    fingerprint = _tokenizer_fingerprint(paths, vocab_size, split)
    stamp = out / TOKENIZER_FINGERPRINT_FILE
    if stamp.is_file() and (out / "tokenizer.json").is_file():
        try:
            same = json.loads(stamp.read_text()).get("fingerprint") == fingerprint
        except ValueError:
            same = False
        if same:
            tok = AutoTokenizer.from_pretrained(str(out))
            tok.padding_side = "right"
            log.info("tokenizer: reusing %s (%d tokens)", out, len(tok))
            return tok

    specials = [BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, *CHAT_TOKENS]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    docs = read_documents(paths, split)
    if not docs:
        raise DataError(f"data.train: {', '.join(map(str, paths))} holds no text")
    bpe.train_from_iterator(docs, trainer=trainer, length=len(docs))
    tok = _as_fast(bpe)

    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    import shutil

    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok.save_pretrained(str(tmp))
    (tmp / TOKENIZER_FINGERPRINT_FILE).write_text(
        json.dumps({"fingerprint": fingerprint, "vocab_size": vocab_size,
                    "sources": [str(p) for p in paths]}, indent=1) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, out)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.padding_side = "right"
    log.info("tokenizer: trained %d tokens on %d documents -> %s", len(tok), len(docs), out)
    return tok

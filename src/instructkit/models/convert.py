"""GGUF files and adapter folders turned once into plain Hugging Face folders, so that every
stage can start from any earlier result like any local model.

A GGUF file is converted into safetensors weights, config and tokenizer under
``~/.cache/instructkit/gguf/<key>/`` (``$INSTRUCTKIT_CACHE`` overrides ``~/.cache/instructkit``);
the key hashes the file's path, size and modification time. Loading and de-quantizing a GGUF file
takes tens of seconds and the result refuses ``save_pretrained``; the converted folder loads in
under a second. An adapter folder (a LoRA ``final/``) is merged into its base under
``.../merged/<key>/``. Each result is built in a temporary folder and renamed into place whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import logging
import os
import shutil
import time
from pathlib import Path

from instructkit.errors import UserError
from instructkit.models.sources import Source

log = logging.getLogger("instructkit.models")


def cache_root() -> Path:
    root = os.environ.get("INSTRUCTKIT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "instructkit"


def gguf_cache_dir(gguf_path: str | Path) -> Path:
    p = Path(gguf_path).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    return cache_root() / "gguf" / key


_MARKER = "instructkit_source.json"  # written last: a folder without it is not a result


def converted_gguf(gguf_path: str | Path) -> Path:
    """The plain Hugging Face folder for a .gguf file; converts it on first use."""
    src = Path(gguf_path).resolve()
    final = gguf_cache_dir(src)
    if (final / _MARKER).exists():
        return final
    try:
        importlib.import_module("gguf")
    except ImportError:
        raise UserError(
            f"loading {src.name} needs the gguf package (a dependency of instructkit): pip install gguf"
        ) from None
    t0 = time.perf_counter()
    log.info("converting %s to safetensors (once; cached in %s)", src, final)
    plain, tok = _dequantized(src)
    st = src.stat()
    _fill_cache(final, {"gguf": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns}, plain, tok)
    log.info("converted %s in %.1f s", src.name, time.perf_counter() - t0)
    return final


def _dequantized(src: Path):
    """(a plain fp32 model, its tokenizer) from a GGUF file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
        quantized = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot load GGUF file {src}: {e}") from None
    # transformers marks a GGUF-loaded model as quantized and refuses to save it; copy the
    # (de-quantized) weights into a plain model built from the same config.
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = str(src)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise UserError(
            f"converting {src}: weights do not match the architecture "
            f"(missing {missing[:5]}, unexpected {unexpected[:5]})"
        )
    plain.generation_config = quantized.generation_config
    return plain, tok


def _fill_cache(final: Path, record: dict, model, tokenizer) -> None:
    """Save ``model`` and ``tokenizer`` in a temporary sibling of ``final`` and rename it into
    place whole, with ``record`` (where it came from) as its marker. A folder another process
    finished first is as good as ours; one without a marker (left incomplete by hand) is replaced."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if final.exists() and not (final / _MARKER).exists():
        shutil.rmtree(final, ignore_errors=True)
    try:
        model.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / _MARKER).write_text(json.dumps(record, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _MARKER).exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def adapter_cache_dir(adapter_dir: str | Path) -> Path:
    p = Path(adapter_dir).resolve()
    stamp = max(f.stat().st_mtime_ns for f in p.iterdir() if f.is_file())
    key = hashlib.sha256(f"{p}\0{stamp}".encode()).hexdigest()[:24]
    return cache_root() / "merged" / key


def merged_adapter(adapter_dir: str | Path) -> Path:
    """A plain Hugging Face folder holding an adapter folder's base with the adapter merged
    in (fp32), built once and cached, so a LoRA result can start the next stage (SFT -> DPO,
    reward model, PPO) like any local model."""
    src = Path(adapter_dir).resolve()
    final = adapter_cache_dir(src)
    if (final / _MARKER).exists():
        return final
    import torch

    from instructkit.models.save import load_for_inference

    model, tokenizer = load_for_inference(src, device="cpu", dtype=torch.float32)
    _fill_cache(final, {"adapter": str(src)}, model.merge_and_unload(), tokenizer)
    return final


@contextlib.contextmanager
def forked_rng(seed: int | None = None):
    """torch's CPU and CUDA random streams, seeded with ``seed`` inside the block when given,
    are as they were after it."""
    import torch

    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=cuda):
        if seed is not None:
            torch.manual_seed(seed)
        yield


def local_folder(source: Source) -> str:
    """The Hugging Face folder behind a local, gguf or adapter source (converted once).

    Filling a cache (loading an adapter draws its initial weights before reading them) runs
    under a forked RNG, so a seeded run draws the same numbers whether the cache was cold or warm."""
    if source.kind not in ("gguf", "adapter"):
        return source.ref
    with forked_rng():
        return str(converted_gguf(source.ref) if source.kind == "gguf" else merged_adapter(source.ref))

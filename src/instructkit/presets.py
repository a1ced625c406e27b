"""Model-size presets: recommended LoRA shape, learning rate and batch layout.

A config selects one with ``preset: llama-2-7b``; the preset's values sit under the YAML file
and the command line, so anything set there wins. The numbers follow common practice for one
80 GB GPU (LoRA ranks as in the QLoRA and Llama recipes; full fine-tuning learning rates an
order of magnitude below LoRA's).
"""

from __future__ import annotations

from instructkit.errors import ConfigError


def _p(r, lr, micro, accum, full_lr=None, hub=None):
    return {
        "hub_id": hub,
        "adapter": {"r": r, "alpha": 2 * r, "dropout": 0.05},
        "lora_lr": lr,
        "full_lr": full_lr or lr / 10,
        "train": {"micro_batch_size": micro, "grad_accum": accum},
    }


PRESETS: dict[str, dict] = {
    "smollm2-135m": _p(16, 2e-4, 8, 2, full_lr=5e-5, hub="HuggingFaceTB/SmolLM2-135M-Instruct"),
    "llama-3.2-1b": _p(16, 2e-4, 8, 2, full_lr=2e-5, hub="meta-llama/Llama-3.2-1B"),
    "llama-3.2-3b": _p(16, 2e-4, 4, 4, full_lr=1e-5, hub="meta-llama/Llama-3.2-3B"),
    "llama-3.1-8b": _p(16, 1e-4, 4, 4, full_lr=1e-5, hub="meta-llama/Llama-3.1-8B"),
    "llama-2-7b": _p(16, 2e-4, 4, 4, full_lr=2e-5, hub="meta-llama/Llama-2-7b-hf"),
    "llama-2-13b": _p(32, 1e-4, 2, 8, full_lr=1e-5, hub="meta-llama/Llama-2-13b-hf"),
    "llama-2-70b": _p(64, 1e-4, 1, 16, full_lr=5e-6, hub="meta-llama/Llama-2-70b-hf"),
    "opt-1.3b": _p(16, 2e-4, 8, 2, full_lr=2e-5, hub="facebook/opt-1.3b"),
}


def preset_values(name: str, full_finetune: bool = False) -> dict:
    """Config values for preset ``name`` as a nested dict (adapter, train)."""
    key = name.lower()
    if key not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    p = PRESETS[key]
    train = dict(p["train"])
    train["lr"] = p["full_lr"] if full_finetune else p["lora_lr"]
    return {"adapter": dict(p["adapter"]), "train": train}

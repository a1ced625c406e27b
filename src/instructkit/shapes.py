"""Model shapes: the tiny LLaMA presets (tests, the laptop demo, pretraining from scratch) and
the one check of a shape given by preset and explicit sizes. A leaf: config checks a pretraining
section with it, models build tiny models and pretraining builds its model from it."""

from __future__ import annotations

from instructkit.errors import ConfigError

# LlamaConfig fields per preset; vocab_size and the special token ids come from the tokenizer.
TINY_PRESETS: dict[str, dict] = {
    "tiny-llama": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "tiny-llama-256": dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
}

# the config section's names -> LlamaConfig's
_FIELDS = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
           "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
           "num_kv_heads": "num_key_value_heads"}


def llama_shape(m) -> dict:
    """LlamaConfig shape fields of a ``model`` section (``shape`` preset, overridden by explicit
    ``hidden_size``, ``intermediate_size``, ``num_layers``, ``num_heads``, ``num_kv_heads``);
    ConfigError naming the key when the shape is unknown, incomplete or inconsistent."""
    shape: dict = {}
    if m.shape is not None:
        key = m.shape.strip().lower()
        if key not in TINY_PRESETS:
            raise ConfigError(f"model.shape={m.shape!r} is not a known shape; choose one of "
                              f"{', '.join(TINY_PRESETS)} or set model.shape=null and give hidden_size, "
                              "intermediate_size, num_layers, num_heads")
        shape.update(TINY_PRESETS[key])
    else:
        missing = [k for k in ("hidden_size", "intermediate_size", "num_layers", "num_heads") if getattr(m, k) is None]
        if missing:
            raise ConfigError("model.shape is not set, so give the shape explicitly: missing "
                              + ", ".join(f"model.{k}" for k in missing))
    for ours, theirs in _FIELDS.items():
        value = getattr(m, ours)
        if value is not None and value <= 0:
            raise ConfigError(f"model.{ours} must be > 0")
        if value is not None:
            shape[theirs] = value
    if m.num_heads is not None and m.num_kv_heads is None:
        shape["num_key_value_heads"] = m.num_heads  # explicit heads without kv heads: plain attention
    shape.setdefault("num_key_value_heads", shape["num_attention_heads"])
    hidden, heads, kv = shape["hidden_size"], shape["num_attention_heads"], shape["num_key_value_heads"]
    if hidden % heads:
        raise ConfigError(f"model.hidden_size={hidden} is not a multiple of model.num_heads={heads}")
    if heads % kv:
        raise ConfigError(f"model.num_heads={heads} is not a multiple of model.num_kv_heads={kv}")
    return shape

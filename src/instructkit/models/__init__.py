"""Models layer: tokenizers, models, adapters, tiny presets, saving and loading for inference.

Contract (docs/DESIGN.md): ``load_tokenizer``, ``load_model``, ``save_final``,
``load_for_inference``; the reward model: ``load_reward_model``, ``reward_scores``,
``save_reward_model``, ``load_reward_stats``.
"""

from instructkit.models.adapters import (
    apply_adapter,
    count_parameters,
    decoder_layers,
    detect_target_modules,
)
from instructkit.models.heads import (
    load_reward_model,
    load_reward_stats,
    reward_scores,
    save_reward_model,
    score_head,
)
from instructkit.models.load import (
    check_context_length,
    compile_layers,
    disable_dropout,
    freeze_layers,
    load_base_model,
    load_model,
    resize_vocab,
    resolve_device,
)
from instructkit.models.save import load_for_inference, save_final, write_final
from instructkit.models.convert import converted_gguf, gguf_cache_dir
from instructkit.models.sources import Source, resolve_source, smollm2_gguf_path
from instructkit.models.tiny import TINY_PRESETS, build_tiny_model, is_tiny_preset, tiny_tokenizer
from instructkit.models.tokenizer import fix_pad_token, load_tokenizer, set_chat_template

__all__ = [
    "score_head",
    "TINY_PRESETS",
    "Source",
    "apply_adapter",
    "build_tiny_model",
    "check_context_length",
    "compile_layers",
    "converted_gguf",
    "count_parameters",
    "decoder_layers",
    "detect_target_modules",
    "disable_dropout",
    "fix_pad_token",
    "freeze_layers",
    "gguf_cache_dir",
    "is_tiny_preset",
    "load_base_model",
    "load_for_inference",
    "load_model",
    "load_reward_model",
    "load_reward_stats",
    "load_tokenizer",
    "resize_vocab",
    "resolve_device",
    "resolve_source",
    "reward_scores",
    "save_final",
    "write_final",
    "save_reward_model",
    "set_chat_template",
    "smollm2_gguf_path",
    "tiny_tokenizer",
]

"""Tiny random LLaMA presets with the shipped byte-level BPE tokenizer.

``tiny-llama`` (0.2M parameters) makes unit tests and CPU smoke runs take seconds;
``tiny-llama-256`` (2.9M) is big enough to see a loss go down in a demo. The weights are a
seeded random initialisation: the same seed gives the same model on every machine.
The tokenizer (vocabulary 1024, ChatML chat template) is built by
``scripts/build_tiny_tokenizer.py`` and ships in ``instructkit/assets/tiny_tokenizer``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from instructkit.errors import UserError
from instructkit.shapes import TINY_PRESETS

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tiny_tokenizer"


def is_tiny_preset(name: str | None) -> bool:
    return isinstance(name, str) and name.strip().lower() in TINY_PRESETS


def tiny_tokenizer():
    """The shipped tiny tokenizer (a fresh copy each call: callers may add tokens to it)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))
    tok.padding_side = "right"
    return tok


def tiny_config(name: str, tokenizer=None):
    from transformers import LlamaConfig

    key = name.strip().lower()
    if key not in TINY_PRESETS:
        raise UserError(f"unknown tiny preset {name!r}; choose one of {', '.join(TINY_PRESETS)}")
    tok = tokenizer if tokenizer is not None else tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **TINY_PRESETS[key],
    )
    cfg._name_or_path = key
    return cfg


def build_tiny_model(
    name: str = "tiny-llama",
    seed: int = 0,
    dtype: torch.dtype | None = None,
    num_labels: int | None = None,
):
    """A randomly initialised LlamaForCausalLM for preset ``name``; the same seed gives the
    same weights. The global RNG state is left as it was.

    ``num_labels``: a LlamaForSequenceClassification instead (a reward model when 1). Its
    decoder is the causal LM's of the same seed (as if loaded from that checkpoint) and its
    ``score`` head is drawn from the same seed."""
    from transformers import GenerationConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = tiny_config(name, tok)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
        if num_labels is not None:
            from transformers import LlamaForSequenceClassification

            cfg.num_labels = num_labels
            torch.manual_seed(seed)
            classifier = LlamaForSequenceClassification(cfg)
            classifier.model.load_state_dict(model.model.state_dict())
            model = classifier
    if dtype is not None:
        model = model.to(dtype)
    model.name_or_path = cfg._name_or_path
    if num_labels is not None:
        return model
    # Stop on either EOS or the end of a ChatML turn.
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")],
        pad_token_id=tok.pad_token_id,
        use_cache=True,
    )
    return model

"""The one generation path (``instructkit.generate``): every caller (``generate``, chat,
evaluation samples, the local judge, RL rollouts) builds its settings with
``generation_kwargs`` and calls ``generate_tokens``, so a checkpoint's generation_config cannot
change what is generated behind the settings' back."""

from __future__ import annotations

import io
from contextlib import contextmanager
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from instructkit.errors import UserError
from instructkit.generate import (
    check_sampling,
    generate_responses,
    generate_tokens,
    generation_kwargs,
    left_pad,
    stop_token_ids,
)

PROMPTS = ["count with me", "say something", "a longer prompt than the others"]
NEW = 12


@pytest.fixture(scope="module")
def tok():
    from instructkit.models.tiny import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    m = LlamaForCausalLM(cfg).eval()
    m.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return m


# What a downloaded checkpoint's generation_config.json may hold: each would change greedy or
# sampled output if generate() took it from the model.
POISON = dict(repetition_penalty=3.0, no_repeat_ngram_size=1, top_k=3, top_p=0.5, temperature=0.3,
              min_length=40)


@contextmanager
def poisoned(model):
    clean = model.generation_config
    model.generation_config = GenerationConfig(**{**clean.to_dict(), **POISON})
    try:
        yield
    finally:
        model.generation_config = clean


def _encoded(model, tok, prompts=PROMPTS):
    from instructkit.data import build_prompt_ids

    return left_pad([build_prompt_ids(p, tok, "auto") for p in prompts], tok.pad_token_id, "cpu")


def test_the_poisoned_config_would_change_plain_generate(model, tok):
    """The premise of the tests below: HF generate with only the call's own settings takes the
    checkpoint's processors (no_repeat_ngram_size 1 forbids any repeated token)."""
    enc = _encoded(model, tok)
    plain = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=[])
    with torch.no_grad():
        clean = model.generate(**enc, **plain)
        with poisoned(model):
            dirty = model.generate(**enc, **plain)
    assert not torch.equal(clean, dirty)
    new = clean[:, enc["input_ids"].shape[1]:]
    assert any(len(set(row.tolist())) < len(row) for row in new), "the greedy answers repeat no token"


def test_generate_tokens_ignores_the_checkpoints_processors(model, tok):
    enc = _encoded(model, tok)
    for temperature in (0.0, 0.9):
        kwargs = generation_kwargs(model, tok, [tok.eos_token_id], max_new_tokens=NEW, temperature=temperature)
        torch.manual_seed(1)
        clean = generate_tokens(model, enc, kwargs)
        with poisoned(model):
            torch.manual_seed(1)
            dirty = generate_tokens(model, enc, kwargs)
        assert clean.shape[0] == len(PROMPTS) and 0 < clean.shape[1] <= NEW
        assert torch.equal(clean, dirty), temperature


def test_repetition_penalty_argument_is_honoured(model, tok):
    enc = _encoded(model, tok)
    stops = stop_token_ids(tok, model)
    plain = generate_tokens(model, enc, generation_kwargs(model, tok, stops, max_new_tokens=NEW, temperature=0))
    penal = generate_tokens(model, enc, generation_kwargs(model, tok, stops, max_new_tokens=NEW, temperature=0,
                                                          repetition_penalty=1e3))
    assert not torch.equal(plain, penal)
    via_responses = generate_responses(model, tok, PROMPTS, max_new_tokens=NEW, temperature=0,
                                       repetition_penalty=1e3)
    assert via_responses == [t.strip() for t in tok.batch_decode(penal, skip_special_tokens=True)]


def test_every_caller_ignores_the_checkpoints_processors(model, tok):
    from instructkit.evaluate.chat import chat
    from instructkit.evaluate.samples import _generate_ids
    from instructkit.rollout import sample

    sec = SimpleNamespace(template="auto", system_prompt=None, max_prompt_len=64, max_new_tokens=NEW,
                          temperature=0.0, top_p=1.0, top_k=0)
    ids = _encoded(model, tok)["input_ids"].tolist()

    def outputs():
        history = chat(model=model, tokenizer=tok, max_new_tokens=NEW, temperature=0,
                       stdin=io.StringIO(PROMPTS[0] + "\n"), stdout=io.StringIO())
        return (generate_responses(model, tok, PROMPTS, max_new_tokens=NEW, temperature=0),
                history[-1]["content"],
                _generate_ids(model, tok, [[{"role": "user", "content": p}] for p in PROMPTS], sec),
                sample(model, tok, ids, max_new_tokens=NEW, temperature=1.0, seed=4).response_ids)

    clean = outputs()
    with poisoned(model):
        dirty = outputs()
    assert clean[0] == dirty[0] and clean[1] == dirty[1] and clean[2] == dirty[2]
    assert torch.equal(clean[3], dirty[3])
    assert clean[1] == clean[0][0]  # chat's first answer is generate's answer to the same line


def test_generate_tokens_restores_training_mode(model, tok):
    enc = _encoded(model, tok, PROMPTS[:1])
    kwargs = generation_kwargs(model, tok, [tok.eos_token_id], max_new_tokens=3, temperature=0)
    seen = []
    model.register_forward_pre_hook(lambda m, a: seen.append(m.training))
    model.train()
    try:
        generate_tokens(model, enc, kwargs)
        assert model.training and seen and not any(seen)  # generated in eval mode (no dropout)
    finally:
        model._forward_pre_hooks.clear()
        model.eval()


def test_a_field_no_argument_can_unset_is_warned_about(model, tok, caplog):
    model.generation_config.suppress_tokens = [5]
    try:
        with caplog.at_level("WARNING", logger="instructkit.generate"):
            generation_kwargs(model, tok, [tok.eos_token_id], max_new_tokens=3, temperature=0)
    finally:
        model.generation_config.suppress_tokens = None
    assert "suppress_tokens" in caplog.text


@pytest.mark.parametrize("kw, flag", [
    (dict(top_k=-1), "--top-k -1"),
    (dict(repetition_penalty=0.0), "--repetition-penalty 0"),
    (dict(repetition_penalty=float("nan")), "--repetition-penalty nan"),
])
def test_check_sampling_names_the_flag(kw, flag):
    with pytest.raises(UserError, match=flag):
        check_sampling(8, 0.7, 0.9, **kw)
    check_sampling(8, 0.7, 0.9, top_k=40, repetition_penalty=1.2)

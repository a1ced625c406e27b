"""The chunked LM loss is the model's own loss, or it is not used.

`train.loss_chunk_size` multiplies hidden states by the LM head weight itself. That is the
model's loss only when the head is a plain bias-free Linear and the forward applies nothing
after it: a LoRA on lm_head, Granite's logits_scaling and Cohere's logit_scale are not.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, CohereConfig, GraniteConfig, LlamaConfig

from instructkit.engine.lm import chunked_head, lm_loss_sum

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             initializer_range=0.5)  # logits far from 0, so a scale on them shows in the loss


def _llama(tied=False):
    return LlamaConfig(**SMALL, tie_word_embeddings=tied)


def _lora_on_head():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_llama())
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0,
                      init_lora_weights=False)  # non-zero B: the adapter changes the logits
    return get_peft_model(model, lora)


def _from(cfg):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


MODELS = {
    "plain": lambda: _from(_llama()),
    "tied": lambda: _from(_llama(tied=True)),
    "lora_lm_head": _lora_on_head,
    "granite": lambda: _from(GraniteConfig(**SMALL, logits_scaling=4.0)),
    "cohere": lambda: _from(CohereConfig(**SMALL, logit_scale=0.0625)),
}
CHUNKED = {"plain": True, "tied": True, "lora_lm_head": False, "granite": False, "cohere": False}


def _batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 96, (2, 12), generator=g)
    targets = torch.roll(ids, -1, dims=1)
    targets[:, :4] = -100  # a prompt: no loss there
    targets[:, -1] = -100
    pos = torch.arange(12).expand(2, 12)
    return {"input_ids": ids, "target_ids": targets, "position_ids": pos}


def _loss_and_grads(model, chunk):
    model.zero_grad(set_to_none=True)
    loss, n = lm_loss_sum(model, _batch(), chunk)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), n, grads


@pytest.mark.parametrize("name", list(MODELS))
def test_chunked_loss_equals_model_loss_and_gradients(name):
    model = MODELS[name]()
    ref_loss, ref_n, ref_grads = _loss_and_grads(model, 0)
    loss, n, grads = _loss_and_grads(model, 5)  # 5 does not divide the 14 targets: a ragged chunk
    assert n == ref_n == 14
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    assert grads.keys() == ref_grads.keys()
    for k in grads:
        scale = float(ref_grads[k].abs().max())  # float32 summation order differs: relative to the largest
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=0, atol=1e-5 * scale + 1e-8, msg=k)
    assert (chunked_head(model) is not None) == CHUNKED[name]


def test_lora_on_lm_head_gets_gradients():
    model = _lora_on_head()
    _, _, grads = _loss_and_grads(model, 5)
    head = [g for k, g in grads.items() if "lm_head.lora_" in k]
    assert len(head) == 2 and all(float(g.abs().sum()) > 0 for g in head)


def test_scaled_heads_change_the_loss():
    # guards the test above: the scale is large enough that ignoring it would show
    plain = _from(_llama())
    granite = _from(GraniteConfig(**SMALL, logits_scaling=4.0))
    granite.load_state_dict(plain.state_dict(), strict=False)
    granite.config.logits_scaling = 1.0
    same = float(lm_loss_sum(granite, _batch(), 0)[0])
    granite.config.logits_scaling = 4.0
    assert abs(float(lm_loss_sum(granite, _batch(), 0)[0]) - same) > 1.0


def test_unchunked_model_is_announced(caplog):
    from instructkit.engine.lm import warn_if_unchunked

    with caplog.at_level("WARNING", logger="instructkit.engine"):
        assert not warn_if_unchunked(MODELS["plain"](), 4096)
        assert not warn_if_unchunked(MODELS["granite"](), 0)
        assert warn_if_unchunked(MODELS["granite"](), 4096)
    assert len(caplog.records) == 1 and "train.loss_chunk_size=4096 is not used" in caplog.text
    assert "granite" in caplog.text

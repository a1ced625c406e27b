"""Rollouts on a tiny random Llama: response masks, log-prob / value / score positions (the
off-by-one cases), left padding, peft, reward functions."""

import functools
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from instructkit.errors import UserError
from instructkit.models import reward_scores, tiny_tokenizer
from instructkit.rollout import (
    RolloutBatch,
    build_batch,
    forward_response_logprobs,
    forward_response_values,
    function_scores,
    load_reward_function,
    response_logprobs,
    response_mask_from_ids,
    response_slice,
    response_values,
    reward_model_scores,
    sample,
    score_responses,
    token_values,
)

EOS = 1020  # <|end_of_text|>
PAD = 1021  # <|pad|>
IM_END = 1023  # <|im_end|>

PROMPTS = [[5, 17, 300, 41], [9, 8], [11, 12, 13, 14, 15, 16, 17]]
# raw sampled responses: garbage after the first stop token must not matter
RESPONSES = torch.tensor(
    [
        [50, 51, EOS, 77, 78, 79],  # stops at index 2
        [60, 61, 62, 63, 64, 65],  # never stops
        [IM_END, 88, EOS, PAD, PAD, PAD],  # stops at once (end of turn)
    ]
)


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def tiny_config(tok, **kw):
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=False,
        **kw,
    )


@pytest.fixture(scope="module")
def policy(tok):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tok)).eval()
    with torch.no_grad():  # sharper logits, so that a wrong position shows
        model.lm_head.weight.mul_(30.0)
    return model


@pytest.fixture(scope="module")
def rm(tok):
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(tiny_config(tok, num_labels=1)).eval()
    with torch.no_grad():
        model.score.weight.mul_(50.0)
    return model


@pytest.fixture
def batch(tok):
    return build_batch(tok, PROMPTS, RESPONSES, stop_ids=[EOS, IM_END])


# --------------------------------------------------------------------------- masks and batch


def test_response_mask_ends_at_first_stop():
    mask, reached = response_mask_from_ids(RESPONSES, [EOS, IM_END])
    assert mask.tolist() == [[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0]]
    assert reached.tolist() == [True, False, True]
    # pad == eos: the first EOS ends the response, the following ones are padding
    mask, reached = response_mask_from_ids(torch.tensor([[7, EOS, EOS, EOS]]), [EOS])
    assert mask.tolist() == [[1, 1, 0, 0]] and reached.tolist() == [True]


def test_build_batch_layout(tok, batch):
    assert (batch.prompt_len, batch.response_len, len(batch)) == (7, 6, 3)
    # prompts left-padded
    assert batch.prompt_ids[1].tolist() == [PAD] * 5 + [9, 8]
    assert batch.prompt_mask[1].tolist() == [0] * 5 + [1, 1]
    # tokens after the first stop replaced by pad
    assert batch.response_ids[0].tolist() == [50, 51, EOS, PAD, PAD, PAD]
    assert batch.response_ids[2].tolist() == [IM_END] + [PAD] * 5
    assert batch.full_ids.shape == (3, 13)
    assert batch.full_mask[0].tolist() == [0, 0, 0, 1, 1, 1, 1] + [1, 1, 1, 0, 0, 0]
    # positions count real tokens only (left padding does not shift RoPE)
    assert batch.position_ids[1, 5:10].tolist() == [0, 1, 2, 3, 4]
    assert batch.reached_eos.tolist() == [True, False, True]
    assert batch.responses[0] == tok.decode([50, 51], skip_special_tokens=True).strip()
    assert batch.responses[2] == ""
    assert batch.prompts[1] == tok.decode([9, 8], skip_special_tokens=True)
    sub = batch.select([2, 0])
    assert sub.response_ids[0].tolist() == batch.response_ids[2].tolist()
    assert sub.prompts == [batch.prompts[2], batch.prompts[0]]
    assert len(batch.select(slice(1, 3))) == 2


def test_response_slice_is_the_prediction_shift():
    # column c of x holds c: token t of the response is predicted at column P - 1 + t
    x = torch.arange(10).repeat(2, 1)
    assert response_slice(x, P=4, T=3).tolist() == [[3, 4, 5]] * 2
    assert response_slice(x.unsqueeze(-1), P=1, T=2).shape == (2, 2, 1)


# --------------------------------------------------------------------------- log-probs


def manual_logprobs(model, batch, temperature=1.0):
    """Per example, unpadded: log softmax(logits[len(prompt) - 1 + t] / temperature)[r_t]."""
    out = torch.zeros(len(batch), batch.response_len)
    for b in range(len(batch)):
        p = batch.prompt_ids[b][batch.prompt_mask[b].bool()]
        r = batch.response_ids[b][batch.response_mask[b].bool()]
        ids = torch.cat([p, r]).unsqueeze(0)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].float() / temperature
        logp = F.log_softmax(logits, -1)
        for t in range(len(r)):
            out[b, t] = logp[len(p) - 1 + t, r[t]]
    return out


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_match_unpadded_forward(policy, batch, temperature):
    expected = manual_logprobs(policy, batch, temperature)
    for mbs in (1, 2, 3):
        got = response_logprobs(policy, batch, micro_batch_size=mbs, temperature=temperature)
        assert got.shape == (3, 6) and got.dtype == torch.float32
        assert torch.allclose(got, expected, atol=1e-5), (mbs, (got - expected).abs().max())
    # padding positions are 0; real ones are proper log-probs that differ between tokens
    assert (got[batch.response_mask == 0] == 0).all()
    assert (got[batch.response_mask == 1] < 0).all() and got[batch.response_mask == 1].std() > 0.1


def test_response_logprobs_without_logits_to_keep(policy, batch, monkeypatch):
    import instructkit.rollout as rollout

    expected = response_logprobs(policy, batch, 3)
    monkeypatch.setattr(rollout, "_accepts_logits_to_keep", lambda model: False)
    assert torch.allclose(response_logprobs(policy, batch, 3), expected, atol=1e-6)


def test_forward_response_logprobs_grad_and_entropy(policy, batch):
    logp, ent = forward_response_logprobs(policy, batch, temperature=1.0, with_entropy=True)
    assert logp.requires_grad
    logp.sum().backward()
    assert policy.lm_head.weight.grad is not None
    policy.zero_grad(set_to_none=True)
    # entropy of the predicting distribution, checked for row 1 (no left padding issue)
    p = batch.prompt_ids[1][batch.prompt_mask[1].bool()]
    r = batch.response_ids[1]
    with torch.no_grad():
        logits = policy(input_ids=torch.cat([p, r]).unsqueeze(0)).logits[0]
    probs = logits.softmax(-1)
    expected = -(probs * logits.log_softmax(-1)).sum(-1)[len(p) - 1 : len(p) - 1 + 6]
    assert torch.allclose(ent[1], expected, atol=1e-5)
    assert (ent[batch.response_mask == 0] == 0).all()
    assert torch.allclose(logp.detach(), response_logprobs(policy, batch, 3), atol=1e-6)


# --------------------------------------------------------------------------- values


def test_response_values_positions(batch):
    # a value "model" that returns each column's position id: the value of response token t
    # must be the position of the token before it, len(prompt) - 1 + t
    def positions(ids, mask, pos):
        return pos.float()

    got = response_values(positions, batch, micro_batch_size=2)
    n_prompt = batch.prompt_mask.sum(1)
    expected = (n_prompt.unsqueeze(1) - 1 + torch.arange(6)) * batch.response_mask
    assert got.tolist() == expected.float().tolist()
    assert got[0, :3].tolist() == [3.0, 4.0, 5.0]


def test_token_values_match_unpadded(rm, batch):
    fn = functools.partial(token_values, rm)
    got = response_values(fn, batch, micro_batch_size=3)
    for b in range(len(batch)):
        p = batch.prompt_ids[b][batch.prompt_mask[b].bool()]
        r = batch.response_ids[b][batch.response_mask[b].bool()]
        ids = torch.cat([p, r]).unsqueeze(0)
        with torch.no_grad():
            v = token_values(rm, ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])[0]
        assert torch.allclose(got[b, : len(r)], v[len(p) - 1 : len(p) - 1 + len(r)], atol=1e-5)
    values = forward_response_values(fn, batch)
    assert values.requires_grad


# --------------------------------------------------------------------------- scores


def test_reward_model_scores_last_real_response_token(rm, batch):
    got = reward_model_scores(rm, batch, micro_batch_size=2)
    expected = []
    for b in range(len(batch)):
        # the sequence as the reward model was trained on it: prompt + response through EOS
        p = batch.prompt_ids[b][batch.prompt_mask[b].bool()]
        r = batch.response_ids[b][batch.response_mask[b].bool()]
        ids = torch.cat([p, r]).unsqueeze(0)
        with torch.no_grad():
            expected.append(reward_scores(rm, ids, torch.ones_like(ids)))
    expected = torch.cat(expected)
    assert expected.std() > 0.01
    assert torch.allclose(got, expected, atol=1e-5)
    # off by one (the token before the EOS) gives something else
    ids = torch.tensor([PROMPTS[0] + [50, 51]])
    with torch.no_grad():
        before = reward_scores(rm, ids, torch.ones_like(ids))
    assert not torch.allclose(before, got[:1], atol=1e-3)
    assert torch.allclose(score_responses(rm, batch), got, atol=1e-6)


def test_function_scores_get_decoded_texts(batch):
    calls = []

    def fn(prompts, responses):
        calls.append((prompts, responses))
        return [float(len(r)) for r in responses]

    got = function_scores(fn, batch)
    assert calls == [(batch.prompts, batch.responses)]
    assert got.tolist() == [float(len(r)) for r in batch.responses]
    assert torch.equal(score_responses(fn, batch), got)
    with pytest.raises(UserError, match="returned 1 scores for 3"):
        function_scores(lambda p, r: [1.0], batch)
    with pytest.raises(UserError, match="non-finite"):
        function_scores(lambda p, r: [1.0, float("nan"), 0.0], batch)
    with pytest.raises(UserError, match="list of numbers"):
        function_scores(lambda p, r: ["a", "b", "c"], batch)


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    (tmp_path / "ik_test_rewards.py").write_text(
        "NOT_CALLABLE = 3\n"
        "def length(prompts, responses):\n"
        "    return [float(len(r)) for r in responses]\n"
    )
    (tmp_path / "ik_test_broken.py").write_text("raise RuntimeError('boom')\n")
    yield tmp_path
    for name in ("ik_test_rewards", "ik_test_broken"):
        sys.modules.pop(name, None)


def test_load_reward_function(reward_module):
    fn = load_reward_function("ik_test_rewards:length")
    assert fn(["p"], ["abc"]) == [3.0]
    assert load_reward_function("ik_test_rewards.py:length")(["p"], ["ab"]) == [2.0]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("ik_test_rewards", "expected 'module:function'"),
        ("ik_test_rewards:", "expected 'module:function'"),
        ("ik_no_such_module_xyz:f", "cannot import module 'ik_no_such_module_xyz'"),
        ("ik_test_rewards:missing", "has no attribute 'missing'"),
        ("ik_test_rewards:NOT_CALLABLE", "not a callable"),
        ("ik_test_broken:f", "RuntimeError: boom"),
        ("nowhere/none.py:f", "no file"),
    ],
)
def test_load_reward_function_errors(reward_module, spec, message):
    with pytest.raises(UserError, match=message):
        load_reward_function(spec)


# --------------------------------------------------------------------------- sampling


STOPS = list(range(0, 1024, 3))  # a third of the vocabulary: most rows stop within a few tokens


def check_masks(b: RolloutBatch, stops):
    stops = set(stops)
    for row in range(len(b)):
        ids = b.response_ids[row].tolist()
        mask = b.response_mask[row].tolist()
        n = sum(mask)
        assert mask == [1] * n + [0] * (len(ids) - n)  # a prefix
        first = next((i for i, t in enumerate(ids) if t in stops), None)
        if first is None:
            assert n == len(ids) and not b.reached_eos[row]
        else:
            assert n == first + 1 and b.reached_eos[row]
            assert all(t == PAD for t in ids[n:])


def test_sample_masks_end_at_first_stop(policy, tok):
    prompts = [[5, 17, 300, 41], [9, 8], [11, 12, 13, 14, 15, 16, 17], [100], [7, 7, 7]]
    b = sample(policy, tok, prompts, max_new_tokens=12, temperature=1.0, stop_ids=STOPS, seed=0)
    assert b.prompt_ids.shape == (5, 7) and b.response_len <= 12
    check_masks(b, STOPS)
    lengths = b.response_mask.sum(1)
    assert b.reached_eos.any() and lengths.min() < lengths.max()  # rows stop at different steps
    # chunked generation gives a batch of the same layout
    c = sample(policy, tok, prompts, max_new_tokens=12, stop_ids=STOPS, seed=0, batch_size=2)
    check_masks(c, STOPS)
    assert c.prompt_ids.tolist() == b.prompt_ids.tolist()


def test_sample_seed_is_reproducible_and_leaves_global_rng(policy, tok):
    state = torch.get_rng_state()
    a = sample(policy, tok, PROMPTS, max_new_tokens=6, stop_ids=[EOS], seed=3, top_k=20,
               top_p=0.9, temperature=0.8)
    b = sample(policy, tok, PROMPTS, max_new_tokens=6, stop_ids=[EOS], seed=3, top_k=20,
               top_p=0.9, temperature=0.8)
    assert torch.equal(a.response_ids, b.response_ids)
    assert torch.equal(torch.get_rng_state(), state)
    with pytest.raises(ValueError):
        sample(policy, tok, PROMPTS, max_new_tokens=4, temperature=0.0)


def test_sampling_logits_match_recomputed_logprobs(policy, tok):
    # generate's own logits (left-padded, KV cache) must give the log-probs that
    # response_logprobs recomputes in one forward pass
    from instructkit.generate import left_pad

    enc = left_pad(PROMPTS, PAD, "cpu")
    torch.manual_seed(5)
    out = policy.generate(**enc, max_new_tokens=5, do_sample=True, top_k=0, top_p=1.0,
                          temperature=1.0, pad_token_id=PAD, eos_token_id=STOPS, use_cache=True,
                          return_dict_in_generate=True, output_logits=True)
    P = enc["input_ids"].shape[1]
    b = build_batch(tok, (enc["input_ids"], enc["attention_mask"]), out.sequences[:, P:], STOPS)
    logits = torch.stack(out.logits, dim=1).float()  # [B, T, V]
    expected = F.log_softmax(logits, -1).gather(-1, b.response_ids.unsqueeze(-1)).squeeze(-1)
    expected = expected * b.response_mask
    got = response_logprobs(policy, b, micro_batch_size=3)
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()


def test_sample_and_logprobs_with_peft(policy, tok):
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(policy), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():  # make the adapter do something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.train()
    b = sample(model, tok, PROMPTS, max_new_tokens=8, stop_ids=STOPS, seed=1)
    assert model.training  # mode restored
    check_masks(b, STOPS)
    got = response_logprobs(model, b, micro_batch_size=2)
    assert model.training
    model.eval()
    assert torch.allclose(got, manual_logprobs(model, b), atol=1e-5)
    # the adapter matters: the base model gives other log-probs
    with model.disable_adapter():
        base = response_logprobs(model, b, micro_batch_size=2)
    assert not torch.allclose(got, base, atol=1e-3)


def test_sample_with_prompt_texts(policy, tok):
    from instructkit.data import build_prompt_ids

    texts = ["What is 2 + 2?", "Name a colour."]
    ids = [build_prompt_ids(t, tok, "auto") for t in texts]
    b = sample(policy, tok, ids, max_new_tokens=4, seed=0, prompts=texts)
    assert b.prompts == texts and len(b.responses) == 2
    # default stop ids: EOS and the ChatML end of turn
    check_masks(b, [EOS, IM_END])

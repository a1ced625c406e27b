"""Where an answer ends: the stop tokens of generation and the token a reward model is read at.

Contract: an answer ends at the token its template puts after it (ChatML ``<|im_end|>``,
Llama-3 ``<|eot_id|>``, Gemma ``<end_of_turn>``, Phi-3 ``<|end|>``, EOS for Alpaca). Generation
stops there; a reward-model row ends there (not at the template's newline after it); RM
training, evaluation, the stored statistics, PPO scoring and ``AutoModelForSequenceClassification``
on the saved folder all read the score at that one position.
"""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForSequenceClassification,
    GenerationConfig,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from instructkit.config import ModelConfig
from instructkit.data import (
    PreferenceGroup,
    build_prompt_ids,
    collate_preference,
    end_of_turn_id,
    tokenize_preference,
)
from instructkit.generate import stop_token_ids
from instructkit.models import reward_scores, save_reward_model
from instructkit.rollout import build_batch, reward_model_scores
from instructkit.stages.rm import reward_statistics
try:
    from conftest_data import CHATML, make_tokenizer
except ImportError:  # pragma: no cover
    from .conftest_data import CHATML, make_tokenizer

LLAMA3 = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>"
    "{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
PHI3 = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
TEMPLATES = {
    # name: (chat template, extra special tokens, data.template, the token that ends an answer)
    "chatml": (CHATML, [], "chat", "<|im_end|>"),
    "llama3": (LLAMA3, ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "chat", "<|eot_id|>"),
    "gemma": (GEMMA, ["<start_of_turn>", "<end_of_turn>"], "chat", "<end_of_turn>"),
    "phi3": (PHI3, ["<|user|>", "<|assistant|>", "<|end|>"], "chat", "<|end|>"),
    "alpaca": (None, [], "alpaca", "</s>"),
}
PROMPT = [{"role": "user", "content": "Give three tips for staying healthy."}]
ANSWERS = ["Eat vegetables, sleep well and exercise every day.", "The capital of France is Paris."]


def tokenizer_for(name: str):
    template, extra, data_template, eot = TEMPLATES[name]
    tok = make_tokenizer(chat_template=template)
    if extra:
        tok.add_tokens(extra, special_tokens=True)
    return tok, data_template, tok.convert_tokens_to_ids(eot)


@pytest.mark.parametrize("name", list(TEMPLATES))
def test_stop_set_holds_the_token_the_template_ends_an_answer_with(name):
    tok, data_template, eot = tokenizer_for(name)
    assert end_of_turn_id(tok, data_template) == eot
    stops = stop_token_ids(tok, None, data_template)
    assert eot in stops and tok.eos_token_id in stops


def test_stop_set_adds_the_generation_config_eos_ids():
    tok, _, eot = tokenizer_for("gemma")

    class Model:
        generation_config = GenerationConfig(eos_token_id=[7, 9])

    assert stop_token_ids(tok, Model(), "chat") == sorted({7, 9, tok.eos_token_id, eot})
    Model.generation_config = GenerationConfig(eos_token_id=11)
    assert 11 in stop_token_ids(tok, Model(), "chat")


def test_stop_set_override_replaces_it_and_rejects_multi_token_strings():
    tok, _, eot = tokenizer_for("phi3")
    assert stop_token_ids(tok, None, "chat", override=["<|end|>", 5]) == sorted({eot, 5})
    with pytest.raises(ValueError, match="not one"):
        stop_token_ids(tok, None, "chat", override=["capital of France"])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        stop_token_ids(tok, None, "chat", override=[len(tok) + 5])


@pytest.mark.parametrize("name", ["gemma", "phi3"])
def test_rollout_response_ends_at_the_templates_end_of_turn(name):
    """Before: only <|im_end|>/<|eot_id|>/<|end_of_turn|> stopped, so a Gemma or Phi-3 response
    ran on into the next turn and got the no-EOS penalty."""
    tok, data_template, eot = tokenizer_for(name)
    prompt = build_prompt_ids(PROMPT, tok, data_template)
    answer = tok.encode("Eat well.", add_special_tokens=False)
    run_on = tok.encode("user\nthanks", add_special_tokens=False)
    response = torch.tensor([answer + [eot] + run_on])
    batch = build_batch(tok, [prompt], response, stop_token_ids(tok, None, data_template))
    assert bool(batch.reached_eos[0])
    assert int(batch.response_mask.sum()) == len(answer) + 1


def tiny_reward_model(tok, seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, num_labels=1)
    return LlamaForSequenceClassification(cfg).eval()


@pytest.mark.parametrize("name", ["chatml", "llama3", "alpaca"])
def test_reward_model_is_read_at_the_same_token_everywhere(name, tmp_path):
    tok, data_template, eot = tokenizer_for(name)
    model = tiny_reward_model(tok)
    examples, _ = tokenize_preference([PreferenceGroup(PROMPT, ANSWERS)], tok, data_template, 256)
    rows = [r["input_ids"] for r in examples[0].responses]
    assert all(r[-1] == eot for r in rows), "a reward-model row ends at the token that closes the answer"

    # RM training and evaluation (collated preference rows), and the stored statistics
    batch = collate_preference(examples, [0], tok.pad_token_id)
    with torch.no_grad():
        trained = reward_scores(model, batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    mean, std = reward_statistics(model, examples, tok.pad_token_id, 1, torch.device("cpu"), "fp32")
    assert mean == pytest.approx(float(trained.mean()), abs=1e-6)
    assert std == pytest.approx(float(trained.std(correction=0)), abs=1e-6)

    # PPO: prompt ids as the rollout builds them, the sampled answer up to its stop token and
    # whatever the sampler produced after it
    prompt = build_prompt_ids(PROMPT, tok, data_template)
    assert all(r[: len(prompt)] == prompt for r in rows)
    junk = tok.encode(" and more", add_special_tokens=False)
    responses = [r[len(prompt):] + junk for r in rows]
    width = max(len(r) for r in responses)
    response_ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in responses])
    ro = build_batch(tok, [prompt, prompt], response_ids, stop_token_ids(tok, None, data_template))
    ppo = reward_model_scores(model, ro, micro_batch_size=8)
    torch.testing.assert_close(ppo, trained, atol=1e-5, rtol=0)

    # transformers on the saved folder, over the text rendered by the template and cut after
    # the token that ends the answer
    final = tmp_path / "final"
    save_reward_model(model, tok, final, ModelConfig(name_or_path="tiny-llama"), mean, std)
    hf = AutoModelForSequenceClassification.from_pretrained(str(final)).eval()
    for answer, expected in zip(ANSWERS, trained):
        if data_template == "chat":
            text = tok.apply_chat_template(PROMPT + [{"role": "assistant", "content": answer}], tokenize=False)
            end = tok.convert_ids_to_tokens(eot)
            text = text[: text.rindex(end) + len(end)]
            ids = tok(text, add_special_tokens=not text.startswith(tok.bos_token))["input_ids"]
        else:
            ids = tok(tok.decode(rows[ANSWERS.index(answer)]), add_special_tokens=False)["input_ids"]
        assert ids in rows
        with torch.no_grad():
            score = hf(input_ids=torch.tensor([ids])).logits[0, 0]
        assert float(score) == pytest.approx(float(expected), abs=1e-5)

"""tokenize_conversation: loss masks, EOS / end-of-turn training, BOS, truncation, templates."""

from __future__ import annotations

import pytest

from instructkit.data import (
    ALPACA_PREAMBLE,
    build_prompt_ids,
    has_target,
    resolve_template,
    tokenize_conversation,
    tokenize_conversations,
)
from instructkit.data.templates import pieces_to_ids
from instructkit.errors import DataError

try:
    from conftest_data import CHATML, PLAIN, decode_trained, make_tokenizer
except ImportError:  # tests/unit became a package
    from .conftest_data import CHATML, PLAIN, decode_trained, make_tokenizer

CONV = [
    {"role": "user", "content": "Give three tips."},
    {"role": "assistant", "content": "Eat well."},
    {"role": "user", "content": "More?"},
    {"role": "assistant", "content": "Sleep."},
]
ALPACA_CONV = [
    {"role": "user", "content": "Add\n\n1 2", "instruction": "Add", "input": "1 2"},
    {"role": "assistant", "content": "3"},
]


def trained_runs(tok, ex):
    """Maximal runs of trained tokens, decoded."""
    runs, cur = [], []
    for t, l in zip(ex["input_ids"], ex["labels"]):
        if l != -100:
            assert l == t
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def test_data_chat_masks_prompt_and_trains_end_of_turn():
    tok = make_tokenizer(CHATML)  # eos </s>, end of turn <|im_end|>
    ex, truncated = tokenize_conversation(CONV, tok, "chat", 1024, False, None)
    assert not truncated
    assert trained_runs(tok, ex) == ["Eat well.<|im_end|>", "Sleep.<|im_end|>"]
    # ids are exactly the tokenizer's rendering of the whole conversation; one BOS
    ref = tok.apply_chat_template(CONV, tokenize=True, return_dict=False)
    assert ex["input_ids"] == ref
    assert ex["input_ids"].count(tok.bos_token_id) == 1 and ex["input_ids"][0] == tok.bos_token_id
    # the newline after <|im_end|> belongs to the template, not to the answer
    assert ex["labels"][-1] == -100


def test_data_chat_eos_is_end_of_turn():
    tok = make_tokenizer(CHATML, eos="<|im_end|>")
    ex, _ = tokenize_conversation(CONV, tok, "auto", 1024, False, None)
    trained = [t for t in ex["labels"] if t != -100]
    assert trained.count(tok.eos_token_id) == 2 and trained[-1] == tok.eos_token_id


def test_data_chat_template_without_end_token_gets_eos():
    tok = make_tokenizer(PLAIN)
    ex, _ = tokenize_conversation(CONV, tok, "chat", 1024, False, None)
    assert trained_runs(tok, ex) == [" Eat well.</s>", " Sleep.</s>"]
    assert ex["input_ids"][0] == tok.bos_token_id  # the tokenizer adds BOS; the template does not
    assert ex["input_ids"].count(tok.bos_token_id) == 1


def test_data_chat_system_prompt():
    tok = make_tokenizer(CHATML)
    ex, _ = tokenize_conversation(CONV[:2], tok, "chat", 1024, False, "Be brief.")
    text = tok.decode(ex["input_ids"])
    assert text.startswith("<s><|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user")
    # a conversation's own system message wins
    conv = [{"role": "system", "content": "Own."}] + CONV[:2]
    ex, _ = tokenize_conversation(conv, tok, "chat", 1024, False, "Be brief.")
    assert "Own." in tok.decode(ex["input_ids"]) and "Be brief." not in tok.decode(ex["input_ids"])


def test_data_alpaca_template():
    tok = make_tokenizer(None)
    assert resolve_template("auto", tok) == "alpaca"
    ex, _ = tokenize_conversation(ALPACA_CONV, tok, "auto", 1024, False, None)
    text = tok.decode(ex["input_ids"])
    assert text == (
        "<s>Below is an instruction that describes a task, paired with an input that provides "
        "further context. Write a response that appropriately completes the request.\n\n"
        "### Instruction:\nAdd\n\n### Input:\n1 2\n\n### Response:\n3</s>"
    )
    assert trained_runs(tok, ex) == ["3</s>"]
    assert ex["labels"][-1] == tok.eos_token_id
    ex, _ = tokenize_conversation(CONV[:2], tok, "alpaca", 1024, False, None)
    assert tok.decode(ex["input_ids"]).startswith("<s>" + ALPACA_PREAMBLE + "\n\n### Instruction:\nGive")
    assert "### Input:" not in tok.decode(ex["input_ids"])


def test_data_alpaca_multi_turn_and_system_prompt():
    tok = make_tokenizer(CHATML)
    ex, _ = tokenize_conversation(CONV, tok, "alpaca", 1024, False, "You answer in short.")
    text = tok.decode(ex["input_ids"])
    assert text.startswith("<s>You answer in short.\n\n### Instruction:\nGive three tips.")
    assert trained_runs(tok, ex) == ["Eat well.</s>", "Sleep.</s>"]


def test_data_train_on_prompt():
    tok = make_tokenizer(CHATML)
    for template in ("chat", "alpaca"):
        ex, _ = tokenize_conversation(CONV, tok, template, 1024, True, None)
        assert ex["labels"] == ex["input_ids"]


def test_data_text_all_tokens_trained_eos_appended():
    tok = make_tokenizer(CHATML)
    ex, _ = tokenize_conversation([{"role": "text", "content": "First Citizen: speak."}], tok,
                                  "auto", 1024, False, None)
    assert ex["labels"] == ex["input_ids"]
    assert ex["input_ids"][0] == tok.bos_token_id and ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(ex["input_ids"]) == "<s>First Citizen: speak.</s>"


def test_data_no_bos_when_the_tokenizer_adds_none():
    tok = make_tokenizer(PLAIN, bos=False)
    ex, _ = tokenize_conversation(CONV, tok, "chat", 1024, False, None)
    assert tok.bos_token_id not in ex["input_ids"]


def test_data_truncation_keeps_start_and_reports():
    tok = make_tokenizer(CHATML)
    full, _ = tokenize_conversation(CONV, tok, "chat", 1024, False, None)
    n = len(full["input_ids"])
    ex, truncated = tokenize_conversation(CONV, tok, "chat", n - 3, False, None)
    assert truncated and ex["input_ids"] == full["input_ids"][: n - 3]
    assert ex["labels"] == full["labels"][: n - 3] and has_target(ex)
    first_trained = next(i for i, l in enumerate(full["labels"]) if l != -100)
    ex, truncated = tokenize_conversation(CONV, tok, "chat", first_trained, False, None)
    assert truncated and not has_target(ex)
    ex, truncated = tokenize_conversation(CONV, tok, "chat", n, False, None)
    assert not truncated


def test_data_chat_without_template_is_an_error():
    tok = make_tokenizer(None)
    with pytest.raises(DataError, match="no chat template"):
        tokenize_conversation(CONV, tok, "chat", 1024, False, None)


def test_data_boundary_inside_a_token_uses_offsets():
    tok = make_tokenizer(CHATML)
    whole = tok("hello world", add_special_tokens=False)["input_ids"]
    split = tok("hel", add_special_tokens=False)["input_ids"] + tok("lo world", add_special_tokens=False)["input_ids"]
    assert whole != split, "the test needs a token that straddles the boundary"
    ids, mask = pieces_to_ids([("hel", False), ("lo world", True)], tok)
    assert ids == whole  # the ids of the whole string, never a re-tokenized concatenation
    offsets = tok("hello world", add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    straddling = next(j for j, (a, b) in enumerate(offsets) if a < 3 < b)
    # tokens wholly before the boundary are prompt; the straddling one counts for the answer
    assert mask == [False] * straddling + [True] * (len(whole) - straddling)
    ids, mask = pieces_to_ids([("hello", False), (" world", True)], tok)
    n_hello = len(tok("hello", add_special_tokens=False)["input_ids"])
    assert ids == whole and mask == [False] * n_hello + [True] * (len(whole) - n_hello)


def test_data_prompt_ids_match_training_prefix():
    tok = make_tokenizer(CHATML)
    for template, sp in (("chat", None), ("chat", "Be brief."), ("alpaca", None)):
        ex, _ = tokenize_conversation(CONV[:2], tok, template, 1024, False, sp)
        first = next(i for i, l in enumerate(ex["labels"]) if l != -100)
        assert build_prompt_ids(CONV[0]["content"], tok, template, sp) == ex["input_ids"][:first]


@pytest.mark.parametrize("bos", [True, False])
def test_data_long_prompt_keeps_bos_and_its_end(bos):
    tok = make_tokenizer(CHATML, bos=bos)
    prompt = " ".join(f"w{i}" for i in range(60)) + " THE END?"
    full = build_prompt_ids(prompt, tok, "chat")
    cut = build_prompt_ids(prompt, tok, "chat", max_len=12)
    assert len(full) > 12 and len(cut) == 12
    assert cut[0] == full[0] and (cut[0] == tok.bos_token_id or not bos)
    assert cut[-11:] == full[-11:]  # the end, next to the answer, is kept
    assert build_prompt_ids(prompt, tok, "chat", max_len=len(full)) == full


def test_data_ppo_prompts_cut_keep_bos(tmp_path):
    from instructkit.config import DataConfig
    from instructkit.data.prompts import load_prompts

    tok = make_tokenizer(CHATML)
    path = tmp_path / "p.jsonl"
    long = " ".join(f"w{i}" for i in range(60))
    path.write_text("\n".join(f'{{"prompt": "{q}"}}' for q in (long + " A?", long + " B?", "short")))
    prompts = load_prompts(DataConfig(train=str(path)), tok, max_prompt_len=16)
    assert [t for t, _ in prompts] == [long + " A?", long + " B?", "short"]  # same end, two prompts
    for _, ids in prompts:
        assert ids[0] == tok.bos_token_id and len(ids) <= 16
    assert tok.decode(prompts[2][1]).count("short") == 1


def test_data_batch_equals_one_by_one():
    tok = make_tokenizer(CHATML)
    convs = [CONV, CONV[:2], [{"role": "text", "content": "hello world"}], ALPACA_CONV]
    for template in ("chat", "alpaca"):
        batch = tokenize_conversations(convs, tok, template, 40, False, None, batch_size=3)
        single = [tokenize_conversation(c, tok, template, 40, False, None) for c in convs]
        assert batch == single


def test_data_chat_template_not_prefix_stable():
    # the header depends on the whole conversation, so prefix renderings differ from the full one
    tok = make_tokenizer("{{ bos_token }}turns: {{ messages | length }}\n" + CHATML.replace("{{ bos_token }}", ""))
    ex, _ = tokenize_conversation(CONV, tok, "chat", 1024, False, None)
    assert trained_runs(tok, ex) == ["Eat well.<|im_end|>", "Sleep.<|im_end|>"]
    assert ex["input_ids"] == tok.apply_chat_template(CONV, tokenize=True, return_dict=False)
    # the answer's text also inside the question: the answer's own occurrence is trained
    conv = [{"role": "user", "content": "Say Paris."}, {"role": "assistant", "content": "Paris."}]
    ex, _ = tokenize_conversation(conv, tok, "chat", 1024, False, None)
    assert trained_runs(tok, ex) == ["Paris.<|im_end|>"]
    assert tok.decode(ex["input_ids"]).count("Paris.") == 2

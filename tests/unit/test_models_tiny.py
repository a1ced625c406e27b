import torch

from instructkit.models import TINY_PRESETS, build_tiny_model, is_tiny_preset, tiny_tokenizer
from instructkit.models.tiny import TOKENIZER_DIR


def test_presets_are_recognised():
    assert is_tiny_preset("tiny-llama") and is_tiny_preset("TINY-LLAMA")
    assert is_tiny_preset("tiny-llama-256")
    assert not is_tiny_preset("meta-llama/Llama-3.2-1B") and not is_tiny_preset(None)


def test_tiny_model_shape_and_vocab(tiny_tokenizer):
    model = build_tiny_model("tiny-llama")
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (64, 128, 2)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 2)
    assert cfg.vocab_size == len(tiny_tokenizer) == 1024
    assert cfg.max_position_embeddings == 2048 and not cfg.tie_word_embeddings
    assert cfg.pad_token_id == tiny_tokenizer.pad_token_id
    assert model.name_or_path == "tiny-llama"
    big = build_tiny_model("tiny-llama-256")
    assert big.config.hidden_size == 256 and big.config.num_hidden_layers == 4


def test_tiny_model_is_deterministic_and_leaves_the_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_tiny_model("tiny-llama", seed=7)
    after = torch.rand(3)
    assert torch.equal(before, after)  # the global RNG stream is untouched
    b = build_tiny_model("tiny-llama", seed=7)
    c = build_tiny_model("tiny-llama", seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


def test_shipped_tokenizer_round_trips(tiny_tokenizer):
    tok = tiny_tokenizer
    text = (
        "To be, or not to be: that is the question.\n"
        "Give three tips for staying healthy! 42 café"
    )
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert len(ids) < len(text)  # it learned merges
    assert tok.bos_token == "<|begin_of_text|>" and tok.eos_token == "<|end_of_text|>"
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id not in (0, tok.eos_token_id)
    for special in ("<|im_start|>", "<|im_end|>"):
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert ids == [tok.convert_tokens_to_ids(special)]
    assert tok.padding_side == "right"


def test_shipped_chat_template_renders(tiny_tokenizer):
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    text = tiny_tokenizer.apply_chat_template(conv, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
    )
    prompt = tiny_tokenizer.apply_chat_template(
        conv[:2], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_shipped_assets_are_small():
    total = sum(p.stat().st_size for p in TOKENIZER_DIR.iterdir())
    assert (TOKENIZER_DIR / "tokenizer.json").exists() and total < 100_000
    assert len(tiny_tokenizer()) == 1024
    assert set(TINY_PRESETS) >= {"tiny-llama", "tiny-llama-256"}

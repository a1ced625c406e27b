import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from instructkit.config import ModelConfig
from instructkit.errors import UserError
from instructkit.models import fix_pad_token, load_tokenizer, set_chat_template
from instructkit.models import sources as sources_mod


def llama3_like(extra_specials=(), size=None):
    """A small WordLevel tokenizer shaped like Llama-3's: '!' is id 0, <|begin_of_text|>."""
    vocab = ["!", "a", "b", "c", "hello", "world"]
    if size is not None:
        vocab += [f"w{i}" for i in range(size - len(vocab) - 2 - len(extra_specials))]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", *extra_specials]
    table = {t: i for i, t in enumerate(vocab + specials)}
    backend = Tokenizer(models.WordLevel(vocab=table, unk_token="!"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )
    return tok


def test_missing_pad_uses_the_finetune_pad_token():
    tok = llama3_like(["<|reserved_special_token_0|>", "<|finetune_right_pad_id|>"])
    assert tok.pad_token is None
    note = fix_pad_token(tok)
    assert tok.pad_token == "<|finetune_right_pad_id|>"
    assert tok.pad_token_id not in (0, tok.eos_token_id)
    assert "no pad token" in note and "<|finetune_right_pad_id|>" in note


def test_llama3_pad_id_0_moves_to_a_reserved_token():
    tok = llama3_like([f"<|reserved_special_token_{i}|>" for i in (3, 1, 0, 2)])
    tok.pad_token = "!"  # what naive code does with pad_token_id = 0
    assert tok.pad_token_id == 0
    n = len(tok)
    note = fix_pad_token(tok)
    assert tok.pad_token == "<|reserved_special_token_0|>"
    assert tok.pad_token_id != 0 and len(tok) == n
    assert "id 0" in note


def test_pad_equal_to_eos_is_replaced():
    tok = llama3_like(["<|reserved_special_token_0|>"])
    tok.pad_token = tok.eos_token
    note = fix_pad_token(tok)
    assert tok.pad_token_id not in (0, tok.eos_token_id)
    assert "EOS" in note


def test_no_reserved_token_adds_pad_and_load_model_resizes(tiny_model_cfg):
    from instructkit.models import load_model

    tok = llama3_like(size=1024)
    assert len(tok) == 1024 and tok.pad_token is None
    note = fix_pad_token(tok)
    assert tok.pad_token == "<|pad|>" and tok.pad_token_id == 1024 and len(tok) == 1025
    assert "resized" in note
    model = load_model(tiny_model_cfg, None, tok, "cpu")
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == 1088  # 1025 rounded up to a multiple of 64
    assert model.get_output_embeddings().weight.shape[0] == 1088
    assert model.config.pad_token_id == 1024


def test_good_pad_is_kept(tiny_tokenizer):
    pad_id = tiny_tokenizer.pad_token_id
    note = fix_pad_token(tiny_tokenizer)
    assert tiny_tokenizer.pad_token_id == pad_id and note.startswith("kept")


def test_shipped_tokenizer_with_pad_as_eos_reuses_its_pad(tiny_tokenizer):
    tiny_tokenizer.pad_token = tiny_tokenizer.eos_token
    fix_pad_token(tiny_tokenizer)
    assert tiny_tokenizer.pad_token == "<|pad|>" and len(tiny_tokenizer) == 1024


def test_load_tokenizer_tiny_preset(tiny_model_cfg):
    tok = load_tokenizer(tiny_model_cfg)
    assert len(tok) == 1024 and tok.padding_side == "right"
    assert tok.pad_token_id not in (0, tok.eos_token_id)
    assert tok.chat_template and tok.instructkit_pad_note.startswith("kept")


def test_chat_template_override_string_file_and_name(tiny_model_cfg, tmp_path):
    tiny_model_cfg.chat_template = (
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    )
    tok = load_tokenizer(tiny_model_cfg)
    conv = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(conv, tokenize=False) == "[user] hi\n"
    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}<{{ m['content'] }}>{% endfor %}")
    tiny_model_cfg.chat_template = str(f)
    assert load_tokenizer(tiny_model_cfg).apply_chat_template(conv, tokenize=False) == "<hi>"
    tok = llama3_like()
    set_chat_template(tok, "chatml")
    assert tok.apply_chat_template(conv, tokenize=False) == "<|im_start|>user\nhi<|im_end|>\n"


def test_bad_chat_template_is_a_user_error(tiny_model_cfg):
    tiny_model_cfg.chat_template = "no/such/template.jinja"
    with pytest.raises(UserError, match="chat_template"):
        load_tokenizer(tiny_model_cfg)
    tiny_model_cfg.chat_template = "{% for m in messages %}"  # unclosed
    with pytest.raises(UserError, match="chat_template"):
        load_tokenizer(tiny_model_cfg)


def test_nonexistent_path_is_a_user_error(tmp_path):
    missing = str(tmp_path / "nope" / "model")
    with pytest.raises(UserError) as e:
        load_tokenizer(ModelConfig(name_or_path=missing))
    assert missing in str(e.value) and ".gguf" in str(e.value) and "tiny-llama" in str(e.value)
    with pytest.raises(UserError, match="no such file"):
        load_tokenizer(ModelConfig(name_or_path="./missing.gguf"))
    with pytest.raises(UserError, match="no such file"):
        load_tokenizer(ModelConfig(name_or_path="not-a-preset"))


def test_offline_hub_id_is_a_user_error(monkeypatch):
    monkeypatch.setattr(sources_mod, "hub_reachable", lambda: False)
    with pytest.raises(UserError, match="offline") as e:
        load_tokenizer(ModelConfig(name_or_path="no-such-org/no-such-model-xyz"))
    assert "no-such-org/no-such-model-xyz" in str(e.value)


def test_local_folder_without_tokenizer_is_a_user_error(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(UserError, match="tokenizer"):
        load_tokenizer(ModelConfig(name_or_path=str(tmp_path)))

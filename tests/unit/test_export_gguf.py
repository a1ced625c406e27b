"""export_gguf: a tiny Llama to GGUF and back through transformers' GGUF loader (CPU, seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from instructkit.errors import UserError
from instructkit.export import GGUF_DTYPES, export_gguf
from instructkit.export.gguf import _llama_cpp_rows
from instructkit.models import build_tiny_model, tiny_tokenizer

TEXTS = [
    "Hello there, how are you?",
    "<|im_start|>user\nWhat is 12+30?<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces\tand tabs\n\nnew lines  ",
    "naïve café, 日本語 and emoji 🙂",
]
# max |logits - reference| / max |reference| per type (measured: f32 0, f16 4e-4, bf16 3e-3,
# q8_0 1e-2 on this model)
REL_TOL = {"f32": 1e-6, "f16": 2e-3, "bf16": 1.5e-2, "q8_0": 4e-2}


def _load_gguf(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model.eval(), tok


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _reader(path):
    import gguf

    return gguf.GGUFReader(str(path))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama with larger-than-initial weights (logits of a useful scale), saved as a
    Hugging Face folder."""
    folder = tmp_path_factory.mktemp("tiny") / "hf"
    model = build_tiny_model("tiny-llama")
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.mul_(4.0)
            else:  # norms: not all ones
                p.add_(0.2 * torch.randn_like(p))
    model.save_pretrained(str(folder))
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def reference(tiny_folder):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_folder), dtype=torch.float32).eval()
    tok = tiny_tokenizer()
    ids = torch.tensor([tok(TEXTS[1] + TEXTS[0])["input_ids"]])
    return model, ids, _logits(model, ids)


@pytest.mark.parametrize("dtype", GGUF_DTYPES)
def test_round_trip_logits(tiny_folder, reference, tmp_path, dtype):
    model, ids, want = reference
    out = export_gguf(tiny_folder, tmp_path / "model.gguf", dtype=dtype)
    assert out == tmp_path / "model.gguf" and out.stat().st_size > 0
    assert not (tmp_path / "model.gguf.tmp").exists()
    loaded, _ = _load_gguf(out)
    got = _logits(loaded, ids)
    scale = want.abs().max().item()
    assert scale > 2.0
    err = (got - want).abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"{dtype}: max |diff| {err:.3g}, scale {scale:.3g}"
    if dtype == "f32":  # lossless: the weights themselves come back, q/k un-permuted
        for key, value in model.state_dict().items():
            torch.testing.assert_close(loaded.state_dict()[key], value, atol=0, rtol=0)
    if dtype == "q8_0":  # lossy but the model still ranks tokens alike
        agree = (got.argmax(-1) == want.argmax(-1)).float().mean().item()
        assert agree >= 0.9


def test_tokenizer_and_chat_template_round_trip(tiny_folder, tmp_path):
    out = export_gguf(tiny_folder, tmp_path / "m.gguf", dtype="f16")
    _, tok = _load_gguf(out)
    src = tiny_tokenizer()
    for text in TEXTS:
        assert tok(text)["input_ids"] == src(text)["input_ids"], text
        assert tok.decode(tok(text)["input_ids"]) == text
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(tok, attr) == getattr(src, attr), attr
    assert tok.chat_template == src.chat_template
    conv = [{"role": "user", "content": "Hi!"}]
    assert tok.apply_chat_template(conv, add_generation_prompt=True, tokenize=True) == \
        src.apply_chat_template(conv, add_generation_prompt=True, tokenize=True)


def test_metadata_and_tensor_layout(tiny_folder, tmp_path):
    import gguf

    Q = gguf.GGMLQuantizationType
    out = export_gguf(tiny_folder, tmp_path / "m.gguf", dtype="q8_0")
    r = _reader(out)
    f = {k: v.contents() for k, v in r.fields.items()}
    cfg = json.loads((tiny_folder / "config.json").read_text())
    assert f["general.architecture"] == "llama"
    assert f["llama.context_length"] == cfg["max_position_embeddings"]
    assert f["llama.embedding_length"] == cfg["hidden_size"]
    assert f["llama.block_count"] == cfg["num_hidden_layers"]
    assert f["llama.feed_forward_length"] == cfg["intermediate_size"]
    assert f["llama.attention.head_count"] == cfg["num_attention_heads"]
    assert f["llama.attention.head_count_kv"] == cfg["num_key_value_heads"]
    assert f["llama.rope.dimension_count"] == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert f["llama.rope.freq_base"] == pytest.approx(cfg["rope_parameters"]["rope_theta"])
    assert f["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg["rms_norm_eps"])
    assert f["llama.vocab_size"] == cfg["vocab_size"] == len(f["tokenizer.ggml.tokens"])
    assert f["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "gpt2"
    tok = tiny_tokenizer()
    assert f["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert f["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert f["tokenizer.ggml.padding_token_id"] == tok.pad_token_id
    assert f["tokenizer.ggml.eot_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")
    assert f["tokenizer.ggml.add_bos_token"] is False
    assert f["tokenizer.ggml.token_type"][tok.eos_token_id] == gguf.TokenType.CONTROL
    assert f["tokenizer.ggml.token_type"][100] == gguf.TokenType.NORMAL
    assert f["tokenizer.chat_template"] == tok.chat_template
    assert len(f["tokenizer.ggml.merges"]) > 0

    types = {t.name: t.tensor_type for t in r.tensors}
    n_layers = cfg["num_hidden_layers"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(n_layers) for n in (
            "attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate",
            "ffn_up", "ffn_down")
    }
    assert set(types) == expected
    for name, qtype in types.items():
        assert qtype == (Q.F32 if "norm" in name else Q.Q8_0), name


def test_q_and_k_rows_follow_llama_cpp_rope(tiny_folder, tmp_path):
    """In the file, q/k rows are in llama.cpp's order: applying rope to adjacent pairs of the
    stored projection gives the Hugging Face rope result (which rotates the two halves of each
    head), reordered the same way."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_folder), dtype=torch.float32)
    out = export_gguf(tiny_folder, tmp_path / "m.gguf", dtype="f32")
    stored = {t.name: np.array(t.data) for t in _reader(out).tensors}
    cfg = model.config
    n_heads, n_kv = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = cfg.hidden_size // n_heads
    theta = cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    pos = torch.arange(5).float()
    angles = pos[:, None] * inv_freq[None]  # [T, head_dim/2]
    cos, sin = angles.cos(), angles.sin()
    x = torch.randn(5, cfg.hidden_size)
    attn = model.model.layers[0].self_attn
    for proj, name, heads in ((attn.q_proj, "attn_q", n_heads), (attn.k_proj, "attn_k", n_kv)):
        w_file = torch.from_numpy(stored[f"blk.0.{name}.weight"])
        torch.testing.assert_close(w_file, _llama_cpp_rows(proj.weight.detach(), heads))
        # Hugging Face: per head, rotate (first half, second half) pairs
        h = (x @ proj.weight.detach().T).reshape(5, heads, head_dim)
        a, b = h[..., : head_dim // 2], h[..., head_dim // 2:]
        c, s = cos[:, None], sin[:, None]
        hf = torch.cat([a * c - b * s, b * c + a * s], dim=-1)
        # llama.cpp (normal rope mode): rotate adjacent pairs (2i, 2i+1)
        g = (x @ w_file.T).reshape(5, heads, head_dim // 2, 2)
        e, o = g[..., 0], g[..., 1]
        cpp = torch.stack([e * c - o * s, o * c + e * s], dim=-1).reshape(5, heads, head_dim)
        hf_in_cpp_order = _llama_cpp_rows(hf.reshape(5, -1).T, heads).T.reshape(5, heads, -1)
        torch.testing.assert_close(cpp, hf_in_cpp_order, atol=1e-5, rtol=1e-5)


def test_tied_embeddings_and_padded_vocabulary(tmp_path):
    """Tied embeddings: no output tensor (llama.cpp reuses token_embd). Embedding rows beyond
    the tokenizer (vocabulary padded to a multiple of 64) get unused placeholder tokens."""
    import gguf
    from transformers import LlamaForCausalLM

    tok = tiny_tokenizer()
    base = build_tiny_model("tiny-llama")
    cfg = base.config
    cfg.tie_word_embeddings = True
    cfg.vocab_size = len(tok) + 64
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = LlamaForCausalLM(cfg)
    folder = tmp_path / "tied"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    out = export_gguf(folder, tmp_path / "tied.gguf", dtype="f32")
    r = _reader(out)
    assert "output.weight" not in {t.name for t in r.tensors}
    tokens = r.fields["tokenizer.ggml.tokens"].contents()
    token_types = r.fields["tokenizer.ggml.token_type"].contents()
    assert len(tokens) == len(tok) + 64
    assert tokens[len(tok)] == f"[PAD{len(tok)}]" and token_types[-1] == gguf.TokenType.UNUSED
    loaded, gtok = _load_gguf(out)
    assert loaded.config.tie_word_embeddings
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    torch.testing.assert_close(_logits(loaded, ids), _logits(model.eval(), ids), atol=1e-5,
                               rtol=0)
    assert gtok(TEXTS[0])["input_ids"] == tok(TEXTS[0])["input_ids"]


def test_output_into_a_folder_and_dtype_aliases(tiny_folder, tmp_path):
    out = export_gguf(tiny_folder, tmp_path, dtype="FP16")
    assert out == tmp_path / "hf-f16.gguf" and out.exists()


# --------------------------------------------------------------------------- bad input


def test_wrong_dtype_lists_the_choices(tiny_folder, tmp_path):
    with pytest.raises(UserError, match="f32, f16, bf16, q8_0"):
        export_gguf(tiny_folder, tmp_path / "m.gguf", dtype="q4_k")
    assert not list(tmp_path.iterdir())


def test_other_architectures_are_refused(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    folder = tmp_path / "opt"
    OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                             ffn_dim=32, num_attention_heads=2, word_embed_proj_dim=16,
                             max_position_embeddings=32)).save_pretrained(str(folder))
    with pytest.raises(UserError, match="LlamaForCausalLM.*OPTForCausalLM"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_missing_and_non_model_inputs(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        export_gguf(tmp_path / "nope", tmp_path / "m.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="neither a model folder"):
        export_gguf(tmp_path / "empty", tmp_path / "m.gguf")
    with pytest.raises(UserError, match="does not exist"):
        export_gguf(tmp_path / "empty", tmp_path / "no" / "dir" / "m.gguf")


def test_failure_leaves_no_file(tiny_folder, tmp_path, monkeypatch):
    import instructkit.export.gguf as mod

    calls = {"n": 0}
    real = mod._tensor_bytes

    def fail_midway(*args):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("interrupted")
        return real(*args)

    monkeypatch.setattr(mod, "_tensor_bytes", fail_midway)
    with pytest.raises(RuntimeError, match="interrupted"):
        export_gguf(tiny_folder, tmp_path / "m.gguf", dtype="f16")
    assert not (tmp_path / "m.gguf").exists()
    assert not (tmp_path / "m.gguf.tmp").exists()


def test_adapter_folder_is_merged_in_memory(tmp_path):
    """An adapter folder exports like its merged model."""
    from peft import LoraConfig, get_peft_model

    from instructkit.config import ModelConfig
    from instructkit.models import load_for_inference, save_final

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        peft_model = get_peft_model(build_tiny_model("tiny-llama"), LoraConfig(
            r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    final = save_final(peft_model, tiny_tokenizer(), tmp_path / "final",
                       ModelConfig(name_or_path="tiny-llama"))
    adapted, tok = load_for_inference(final, dtype=torch.float32)
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    out = export_gguf(final, tmp_path / "a.gguf", dtype="f32")
    loaded, _ = _load_gguf(out)
    torch.testing.assert_close(_logits(loaded, ids), _logits(adapted, ids), atol=1e-5, rtol=0)


def _rope_folder(tmp_path, rope_parameters):
    from transformers import LlamaForCausalLM

    tok = tiny_tokenizer()
    cfg = build_tiny_model("tiny-llama").config
    cfg.rope_parameters = rope_parameters
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
    folder = tmp_path / "rope"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def test_llama3_rope_scaling_writes_frequency_factors(tmp_path):
    """Llama 3.1-style rope: llama.cpp reads per-frequency divisors from ``rope_freqs``."""
    folder = _rope_folder(tmp_path, {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024})
    out = export_gguf(folder, tmp_path / "l3.gguf", dtype="f16")
    tensors = {t.name: t for t in _reader(out).tensors}
    freqs = np.array(tensors["rope_freqs.weight"].data)
    assert freqs.shape == (8,)  # head_dim 16 / 2
    assert freqs[0] == pytest.approx(1.0)  # high frequencies unchanged
    assert freqs[-1] == pytest.approx(8.0)  # the lowest ones divided by the factor
    assert np.all(np.diff(freqs) >= -1e-6)


def test_linear_rope_scaling_and_unsupported_scaling(tmp_path):
    folder = _rope_folder(tmp_path, {"rope_type": "linear", "rope_theta": 10000.0,
                                     "factor": 2.0})
    fields = _reader(export_gguf(folder, tmp_path / "lin.gguf", dtype="f16")).fields
    assert fields["llama.rope.scaling.type"].contents() == "linear"
    assert fields["llama.rope.scaling.factor"].contents() == pytest.approx(2.0)
    yarn = _rope_folder(tmp_path / "y", {"rope_type": "dynamic", "rope_theta": 10000.0,
                                         "factor": 2.0})
    with pytest.raises(UserError, match="rope scaling 'dynamic'"):
        export_gguf(yarn, tmp_path / "dyn.gguf")
    assert not (tmp_path / "dyn.gguf").exists() and not (tmp_path / "dyn.gguf.tmp").exists()


def test_pre_tokenizer_names(tmp_path):
    """The pre-tokenizer is named as llama.cpp knows it: plain byte-level -> gpt2, digits split
    first -> smollm, Llama 3's regex -> llama-bpe (and transformers reads that one back)."""
    from tokenizers import Regex, pre_tokenizers
    from transformers import AutoModelForCausalLM

    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS

    model = AutoModelForCausalLM.from_config(build_tiny_model("tiny-llama").config)
    variants = {
        "smollm": pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
        "llama-bpe": pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS["llama-bpe"]), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    }
    for name, pre in variants.items():
        tok = tiny_tokenizer()
        tok.backend_tokenizer.pre_tokenizer = pre
        out = export_gguf(tmp_path / name, tmp_path / f"{name}.gguf", model=model, tokenizer=tok)
        assert _reader(out).fields["tokenizer.ggml.pre"].contents() == name
        if name == "llama-bpe":
            _, back = _load_gguf(out)
            for text in TEXTS + ["In 2024 we had 12345 items."]:
                assert back(text)["input_ids"] == tok(text)["input_ids"], text


def _sentencepiece_style_tokenizer():
    """A Llama 2-style tokenizer (BPE with byte fallback, spaces as "▁" with one prepended,
    <s> added), trained on the tiny tokenizer's README."""
    from pathlib import Path

    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    import instructkit.models.tiny as tiny

    text = (Path(tiny.TOKENIZER_DIR) / "README.md").read_text().splitlines()
    tk = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                          normalizers.Replace(" ", "▁")])
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator(text * 5, trainers.BpeTrainer(vocab_size=640, show_progress=False,
                                                         special_tokens=specials))
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                    decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0",
                                                      special_tokens=[("<s>", 1)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.chat_template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}"
    return tok


def test_sentencepiece_style_tokenizer_round_trip(tmp_path):
    """Llama 2's tokenizer kind: tokenizer.ggml.model "llama" with scores and byte tokens; the
    file loads back with the same ids (BOS included) and logits."""
    import gguf
    from transformers import LlamaForCausalLM

    tok = _sentencepiece_style_tokenizer()
    cfg = build_tiny_model("tiny-llama").config
    cfg.vocab_size = len(tok)
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        model = LlamaForCausalLM(cfg).eval()
    folder = tmp_path / "llama2-style"
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    out = export_gguf(folder, tmp_path / "l2.gguf", dtype="f32")
    f = {k: v.contents() for k, v in _reader(out).fields.items()}
    assert f["tokenizer.ggml.model"] == "llama" and "tokenizer.ggml.pre" not in f
    types, tokens = f["tokenizer.ggml.token_type"], f["tokenizer.ggml.tokens"]
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == gguf.TokenType.CONTROL
    assert types[tokens.index("<0x41>")] == gguf.TokenType.BYTE
    assert f["tokenizer.ggml.add_bos_token"] is True and f["tokenizer.ggml.add_space_prefix"]
    assert len(f["tokenizer.ggml.scores"]) == len(tokens)

    loaded, back = _load_gguf(out)
    # (not text that starts with a space: transformers rebuilds the tokenizer with a Metaspace
    # that prepends "▁" only when the text does not start with one, where sentencepiece, this
    # tokenizer and llama.cpp always prepend it)
    for text in [t for t in TEXTS if not t.startswith(" ")] + ["a  b\tc\n\nd  "]:
        assert back(text)["input_ids"] == tok(text)["input_ids"], text
    assert back.chat_template == tok.chat_template
    ids = torch.tensor([tok(TEXTS[0])["input_ids"]])
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), atol=1e-5, rtol=0)

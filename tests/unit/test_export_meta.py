"""Meta checkpoint conversion: a tiny LlamaForCausalLM with known weights is written in Meta's
layout (interleaved rotary rows, Meta key names, params.json, model-parallel shards) with a
small tokenizer.model, converted back, and compared: logits against the known model and
against an independent forward pass written the way Meta's reference code computes it
(complex rotation of interleaved pairs); tokenizers against sentencepiece / a tiktoken-style
encoder."""

from __future__ import annotations

import base64
import json
import math
from collections import Counter

import pytest
import regex
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from instructkit.errors import UserError
from instructkit.export import meta as meta_mod
from instructkit.export.meta import (
    LLAMA3_PATTERN,
    build_llama3_tokenizer,
    convert_meta_checkpoint,
    intermediate_size,
    llama3_special_tokens,
    permute_rotary,
    read_params,
)

DIM, N_HEADS, N_KV, N_LAYERS = 64, 4, 2, 2
HD = DIM // N_HEADS

CORPUS = (
    "The quick brown fox jumps over the lazy dog. Instruction tuning teaches a model to "
    "follow instructions. The model answers the question; the reward model ranks answers. "
    "It's the weights that matter, isn't it? Llama models use rotary position embeddings "
    "and grouped-query attention with fewer key and value heads than query heads.\n"
) * 4

TEXTS = [
    "The quick brown fox",
    "Hello world! It's 2024, isn't it?\n\n  indented\tTabs   and spaces  ",
    "héllo 日本 🦙 1234567",
    "instructions\nanswers\r\n",
    "",
]


# --------------------------------------------------------------------------- helpers


def tiny_llama(vocab: int, inter: int, seed: int = 0, rope_parameters=None, max_pos=2048,
               tied=False):
    cfg = LlamaConfig(
        vocab_size=vocab, hidden_size=DIM, intermediate_size=inter, num_hidden_layers=N_LAYERS,
        num_attention_heads=N_HEADS, num_key_value_heads=N_KV, rms_norm_eps=1e-5,
        max_position_embeddings=max_pos, tie_word_embeddings=tied,
        rope_parameters=rope_parameters or {"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # weights large enough that every wrong row shows in the logits
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model.eval()


def to_meta_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF half-split rows -> Meta interleaved rows, written as an explicit index map:
    Meta row h*d + 2i + j holds HF row h*d + j*d/2 + i."""
    d = w.shape[0] // n_heads
    idx = [h * d + j * (d // 2) + i for h in range(n_heads) for i in range(d // 2) for j in (0, 1)]
    return w[idx]


def meta_state_dict(model) -> dict[str, torch.Tensor]:
    sd = model.state_dict()
    out = {"tok_embeddings.weight": sd["model.embed_tokens.weight"],
           "norm.weight": sd["model.norm.weight"]}
    if not model.config.tie_word_embeddings:
        out["output.weight"] = sd["lm_head.weight"]
    for i in range(N_LAYERS):
        pre = f"model.layers.{i}."
        out[f"layers.{i}.attention.wq.weight"] = to_meta_rows(sd[pre + "self_attn.q_proj.weight"], N_HEADS)
        out[f"layers.{i}.attention.wk.weight"] = to_meta_rows(sd[pre + "self_attn.k_proj.weight"], N_KV)
        out[f"layers.{i}.attention.wv.weight"] = sd[pre + "self_attn.v_proj.weight"]
        out[f"layers.{i}.attention.wo.weight"] = sd[pre + "self_attn.o_proj.weight"]
        out[f"layers.{i}.feed_forward.w1.weight"] = sd[pre + "mlp.gate_proj.weight"]
        out[f"layers.{i}.feed_forward.w2.weight"] = sd[pre + "mlp.down_proj.weight"]
        out[f"layers.{i}.feed_forward.w3.weight"] = sd[pre + "mlp.up_proj.weight"]
        out[f"layers.{i}.attention_norm.weight"] = sd[pre + "input_layernorm.weight"]
        out[f"layers.{i}.ffn_norm.weight"] = sd[pre + "post_attention_layernorm.weight"]
    return {k: v.detach().clone() for k, v in out.items()}


def split_shards(state, n: int, embed_dim: int) -> list[dict[str, torch.Tensor]]:
    """Model-parallel shards as Meta's fairscale layers hold them."""
    shards = [{} for _ in range(n)]
    for key, t in state.items():
        if any(s in key for s in ("wq", "wk", "wv", "w1", "w3", "output")):
            parts = t.chunk(n, 0)
        elif any(s in key for s in ("wo", "w2")):
            parts = t.chunk(n, 1)
        elif key == "tok_embeddings.weight":
            parts = t.chunk(n, embed_dim)
        else:
            parts = [t] * n
        for shard, part in zip(shards, parts):
            shard[key] = part.clone()
    return shards


def write_meta(folder, model, params: dict, n_shards=1, embed_dim=1, rope_freqs=False):
    folder.mkdir(parents=True, exist_ok=True)
    state = meta_state_dict(model)
    if rope_freqs:
        state["rope.freqs"] = torch.zeros(HD // 2)
    for k, shard in enumerate(split_shards(state, n_shards, embed_dim)):
        torch.save(shard, folder / f"consolidated.{k:02d}.pth")
    (folder / "params.json").write_text(json.dumps(params))
    return state


def rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def llama3_scaled(freqs, factor, low, high, old_len):
    """Meta's apply_scaling (Llama 3.1), written per frequency."""
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < old_len / high:
            out.append(f)
        elif wavelen > old_len / low:
            out.append(f / factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            out.append((1 - smooth) * f / factor + smooth * f)
    return torch.tensor(out)


def meta_forward(sd, tokens, positions, theta=10000.0, n_kv=N_KV, scaling=None):
    """Logits the way Meta's llama/model.py computes them: interleaved pairs rotated as
    complex numbers, key/value heads repeated for the query heads."""
    freqs = 1.0 / (theta ** (torch.arange(0, HD, 2).float() / HD))
    if scaling:
        freqs = llama3_scaled(freqs, *scaling)
    angles = positions.float()[:, None] * freqs[None]
    cis = torch.polar(torch.ones_like(angles), angles)  # [L, HD/2]

    def rotate(t):
        c = torch.view_as_complex(t.float().reshape(*t.shape[:-1], HD // 2, 2))
        return torch.view_as_real(c * cis[None, :, None, :]).flatten(3)

    B, L = tokens.shape
    h = sd["tok_embeddings.weight"][tokens]
    mask = torch.full((L, L), float("-inf")).triu(1)
    for i in range(N_LAYERS):
        w = lambda k: sd[f"layers.{i}.{k}.weight"]  # noqa: E731
        x = rms(h, w("attention_norm"))
        q = rotate((x @ w("attention.wq").T).view(B, L, N_HEADS, HD))
        k = rotate((x @ w("attention.wk").T).view(B, L, n_kv, HD))
        v = (x @ w("attention.wv").T).view(B, L, n_kv, HD)
        k = k.repeat_interleave(N_HEADS // n_kv, dim=2)
        v = v.repeat_interleave(N_HEADS // n_kv, dim=2)
        scores = torch.einsum("blhd,bmhd->bhlm", q, k) / math.sqrt(HD) + mask
        att = torch.einsum("bhlm,bmhd->blhd", scores.softmax(-1), v).reshape(B, L, DIM)
        h = h + att @ w("attention.wo").T
        x = rms(h, w("ffn_norm"))
        ff = torch.nn.functional.silu(x @ w("feed_forward.w1").T) * (x @ w("feed_forward.w3").T)
        h = h + ff @ w("feed_forward.w2").T
    head = sd.get("output.weight", sd["tok_embeddings.weight"])
    return rms(h, sd["norm.weight"]) @ head.T


def logits(model, ids, positions=None):
    with torch.no_grad():
        pos = None if positions is None else positions[None].expand_as(ids)
        return model(input_ids=ids, position_ids=pos).logits.float()


# ---- Llama 3 tokenizer: a tiny byte-level BPE in tiktoken's file format


def train_byte_bpe(text: str, n_merges: int) -> dict[bytes, int]:
    ranks = {bytes([b]): b for b in range(256)}
    words = Counter(tuple(bytes([c]) for c in w.encode()) for w in regex.findall(LLAMA3_PATTERN, text))
    for _ in range(n_merges):
        pairs = Counter()
        for word, c in words.items():
            for a, b in zip(word, word[1:]):
                pairs[a, b] += c
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        ranks[a + b] = len(ranks)
        merged = Counter()
        for word, c in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += c
        words = merged
    return ranks


def tiktoken_encode(text: str, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's algorithm: whole piece if it is a token, else merge the lowest-ranked
    adjacent pair until none is a token."""
    out = []
    for piece in regex.findall(LLAMA3_PATTERN, text):
        b = piece.encode()
        if b in ranks:
            out.append(ranks[b])
            continue
        parts = [bytes([x]) for x in b]
        while True:
            best = min(((ranks[parts[i] + parts[i + 1]], i) for i in range(len(parts) - 1)
                        if parts[i] + parts[i + 1] in ranks), default=None)
            if best is None:
                break
            i = best[1]
            parts[i:i + 2] = [parts[i] + parts[i + 1]]
        out += [ranks[p] for p in parts]
    return out


def write_tiktoken(path, ranks):
    lines = [f"{base64.b64encode(t).decode()} {r}" for t, r in sorted(ranks.items(), key=lambda x: x[1])]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def llama3_ranks():
    return train_byte_bpe(CORPUS, 60)


def llama3_params(vocab, **extra):
    p = {"dim": DIM, "n_layers": N_LAYERS, "n_heads": N_HEADS, "n_kv_heads": N_KV,
         "vocab_size": vocab, "multiple_of": 32, "ffn_dim_multiplier": 1.3, "norm_eps": 1e-5,
         "rope_theta": 500000.0}
    p.update(extra)
    return p


def llama3_checkpoint(tmp_path, ranks, n_shards=1, seed=0, version_extra=None, tied=False):
    vocab = len(ranks) + 256
    inter = intermediate_size(DIM, 32, 1.3)
    extra = version_extra or {}
    rope = {"rope_type": "default", "rope_theta": 500000.0}
    if extra.get("use_scaled_rope"):
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    model = tiny_llama(vocab, inter, seed=seed, rope_parameters=rope, max_pos=131072, tied=tied)
    meta_dir = tmp_path / "Meta-Llama-3-tiny"
    state = write_meta(meta_dir, model, llama3_params(vocab, **extra), n_shards, embed_dim=0)
    write_tiktoken(meta_dir / "tokenizer.model", ranks)
    return model, state, meta_dir


IDS = torch.tensor([[5, 17, 300, 41, 9, 200, 77, 128, 3], [1, 2, 3, 4, 5, 6, 310, 90, 250]])


# --------------------------------------------------------------------------- tests


def test_intermediate_size_of_published_models():
    assert intermediate_size(4096, 256, None) == 11008  # Llama 2 7B
    assert intermediate_size(5120, 256, None) == 13824  # Llama 2 13B
    assert intermediate_size(8192, 4096, 1.3) == 28672  # Llama 2 70B
    assert intermediate_size(4096, 1024, 1.3) == 14336  # Llama 3 8B
    assert intermediate_size(2048, 256, 1.5) == 8192  # Llama 3.2 1B
    assert intermediate_size(3072, 256, 1.0) == 8192  # Llama 3.2 3B


def test_permute_rotary_turns_interleaved_rotation_into_half_rotation():
    g = torch.Generator().manual_seed(0)
    n, d = 3, 8
    w = torch.randn(n * d, 5, generator=g)
    x = torch.randn(5, generator=g)
    ang = torch.randn(d // 2, generator=g)
    # Meta: rotate (2i, 2i+1) by ang[i]
    y = (w @ x).view(n, d // 2, 2)
    c, s = ang.cos(), ang.sin()
    meta = torch.stack([y[..., 0] * c - y[..., 1] * s, y[..., 0] * s + y[..., 1] * c], -1).view(n, d)
    # HF: rotate_half with cos/sin repeated over the two halves
    z = (permute_rotary(w, n) @ x).view(n, d)
    cos, sin = torch.cat([c, c]), torch.cat([s, s])
    hf = z * cos + torch.cat([-z[:, d // 2:], z[:, : d // 2]], -1) * sin
    # same values, HF order = evens then odds of Meta's order
    torch.testing.assert_close(hf, torch.cat([meta[:, 0::2], meta[:, 1::2]], -1))
    assert torch.equal(permute_rotary(to_meta_rows(w, n), n), w)


def test_llama3_special_tokens():
    v3, v31 = llama3_special_tokens("3"), llama3_special_tokens("3.1")
    assert len(v3) == len(v31) == 256
    assert v3[:2] == ["<|begin_of_text|>", "<|end_of_text|>"] and v3[9] == v31[9] == "<|eot_id|>"
    assert v3[6:8] == v31[6:8] == ["<|start_header_id|>", "<|end_header_id|>"]
    assert v3[-1] == "<|reserved_special_token_250|>" and v31[-1] == "<|reserved_special_token_247|>"
    assert v31[4] == "<|finetune_right_pad_id|>" and v31[8] == "<|eom_id|>" and v31[10] == "<|python_tag|>"
    assert len(set(v31)) == 256


@pytest.mark.parametrize("n_shards", [1, 2])
def test_llama3_conversion_logits_and_tokenizer(tmp_path, llama3_ranks, n_shards):
    model, state, meta_dir = llama3_checkpoint(tmp_path, llama3_ranks, n_shards)
    out = convert_meta_checkpoint(meta_dir, tmp_path / "hf", dtype="fp32")
    assert out == tmp_path / "hf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Meta-Llama-3-tiny", "hf"]  # no temp left
    converted = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    cfg = converted.config
    assert (cfg.num_key_value_heads, cfg.num_attention_heads, cfg.intermediate_size) == (N_KV, N_HEADS, 224)
    assert cfg.rope_parameters["rope_theta"] == 500000.0 and cfg.max_position_embeddings == 8192
    assert cfg.tie_word_embeddings is False
    torch.testing.assert_close(logits(converted, IDS), logits(model, IDS), rtol=0, atol=1e-5)
    ref = meta_forward(state, IDS, torch.arange(IDS.shape[1]), theta=500000.0)
    torch.testing.assert_close(logits(converted, IDS), ref, rtol=1e-5, atol=1e-5)
    info = json.loads((out / "instructkit.json").read_text())
    assert info["llama_version"] == "3" and info["shards"] == [f"consolidated.{k:02d}.pth" for k in range(n_shards)]

    tok = AutoTokenizer.from_pretrained(out)
    n = len(llama3_ranks)
    assert len(tok) == n + 256 == cfg.vocab_size
    assert tok.bos_token_id == n == cfg.bos_token_id and tok.eos_token_id == n + 1
    assert tok.convert_tokens_to_ids("<|eot_id|>") == n + 9
    assert converted.generation_config.eos_token_id == [n + 1, n + 9]
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert ids == [n] + tiktoken_encode(text, llama3_ranks), text
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok("the model")["input_ids"]) < len(b"the model")  # merges are used
    chat = tok.apply_chat_template([{"role": "user", "content": " Hi "}], tokenize=False,
                                   add_generation_prompt=True)
    assert chat == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok(chat, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [n, n + 6] and ids.count(n + 9) == 1


def test_wrong_rotary_layout_would_show_in_the_logits(tmp_path, llama3_ranks, monkeypatch):
    """The logit comparison is sensitive to the permutation: skipping it breaks equality."""
    model, _, meta_dir = llama3_checkpoint(tmp_path, llama3_ranks)
    monkeypatch.setattr(meta_mod, "permute_rotary", lambda w, n: w)
    out = convert_meta_checkpoint(meta_dir, tmp_path / "hf", dtype="fp32")
    converted = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert (logits(converted, IDS) - logits(model, IDS)).abs().max() > 1e-2


def test_llama31_scaled_rope_and_loading_with_instructkit(tmp_path, llama3_ranks):
    model, state, meta_dir = llama3_checkpoint(tmp_path, llama3_ranks,
                                               version_extra={"use_scaled_rope": True})
    out = convert_meta_checkpoint(meta_dir, tmp_path / "hf", dtype="fp32")
    converted = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    rope = converted.config.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    assert rope["original_max_position_embeddings"] == 8192
    assert converted.config.max_position_embeddings == 131072
    assert json.loads((out / "instructkit.json").read_text())["llama_version"] == "3.1"
    tok = AutoTokenizer.from_pretrained(out)
    assert "<|finetune_right_pad_id|>" in tok.get_vocab()
    # far-apart positions, where the scaled low frequencies matter
    pos = torch.arange(IDS.shape[1]) * 3001
    got = logits(converted, IDS, pos)
    torch.testing.assert_close(got, logits(model, IDS, pos), rtol=0, atol=1e-5)
    ref = meta_forward(state, IDS, pos, theta=500000.0, scaling=(8.0, 1.0, 4.0, 8192))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    unscaled = meta_forward(state, IDS, pos, theta=500000.0)
    assert (got - unscaled).abs().max() > 1e-2

    from instructkit.models import load_for_inference

    loaded, itok = load_for_inference(out, dtype=torch.float32)
    assert len(itok) == len(tok)  # a reserved token became the pad token; no resize
    torch.testing.assert_close(logits(loaded, IDS, pos), got, rtol=0, atol=1e-5)


def test_bf16_default_and_tied_embeddings(tmp_path, llama3_ranks):
    model, _, meta_dir = llama3_checkpoint(tmp_path, llama3_ranks, tied=True)
    assert "output.weight" not in torch.load(meta_dir / "consolidated.00.pth", weights_only=True)
    out = convert_meta_checkpoint(meta_dir, tmp_path / "hf")
    converted = LlamaForCausalLM.from_pretrained(out)
    assert converted.config.tie_word_embeddings is True
    assert converted.model.embed_tokens.weight.dtype == torch.bfloat16
    # the bf16 weights are Meta's fp32 weights rounded once, so equal to the known model's
    # rounded (logits would differ by bf16 rounding between attention kernels)
    want = model.to(torch.bfloat16).state_dict()
    got = converted.state_dict()
    assert set(got) == set(want)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


@pytest.mark.parametrize("n_shards", [1, 2])
def test_llama2_sentencepiece_conversion(tmp_path, n_shards):
    spm = pytest.importorskip("sentencepiece")
    import io
    import random

    rnd = random.Random(0)
    words = CORPUS.split()
    lines = [" ".join(rnd.choice(words) for _ in range(12)) for _ in range(500)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, minloglevel=2, hard_vocab_limit=False,
    )
    sp = spm.SentencePieceProcessor(model_proto=buf.getvalue())
    vocab = sp.get_piece_size()
    inter = intermediate_size(DIM, 32, None)
    model = tiny_llama(vocab, inter, seed=3)
    # Llama 2 download layout: llama-2-7b/{consolidated.*.pth, params.json}, tokenizer.model one up
    meta_dir = tmp_path / "llama" / "llama-2-tiny"
    params = {"dim": DIM, "n_layers": N_LAYERS, "n_heads": N_HEADS, "n_kv_heads": N_KV,
              "multiple_of": 32, "norm_eps": 1e-5, "vocab_size": -1}
    state = write_meta(meta_dir, model, params, n_shards, embed_dim=1, rope_freqs=True)
    (tmp_path / "llama" / "tokenizer.model").write_bytes(buf.getvalue())

    out = convert_meta_checkpoint(meta_dir, tmp_path / "hf", dtype="fp32")
    converted = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert converted.config.vocab_size == vocab and converted.config.max_position_embeddings == 4096
    assert converted.config.intermediate_size == inter == 192
    torch.testing.assert_close(logits(converted, IDS), logits(model, IDS), rtol=0, atol=1e-5)
    ref = meta_forward(state, IDS, torch.arange(IDS.shape[1]))
    torch.testing.assert_close(logits(converted, IDS), ref, rtol=1e-5, atol=1e-5)

    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == vocab and (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (1, 2, 0)
    for text in TEXTS + ["  leading spaces", "instruction tuning"]:
        ids = tok(text)["input_ids"]
        assert ids == [1] + sp.encode(text), text
        assert tok.decode(ids, skip_special_tokens=True) == text
    chat = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
        tokenize=False,
    )
    assert chat == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s>"
                    "<s>[INST] Bye [/INST]")


def test_sentencepiece_reader_agrees_with_sentencepiece(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from sentencepiece import sentencepiece_model_pb2 as pb

    import io

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines() * 20), model_writer=buf, vocab_size=300,
        model_type="bpe", byte_fallback=True, minloglevel=2, hard_vocab_limit=False,
    )
    path = tmp_path / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    ours = meta_mod.read_sentencepiece_model(path)
    ref = pb.ModelProto()
    ref.ParseFromString(buf.getvalue())
    assert ours.pieces == [(p.piece, pytest.approx(p.score), p.type) for p in ref.pieces]
    assert ours.model_type == ref.trainer_spec.model_type == 2 and ours.byte_fallback
    assert ours.add_dummy_prefix == ref.normalizer_spec.add_dummy_prefix
    assert ours.remove_extra_whitespaces == ref.normalizer_spec.remove_extra_whitespaces


# ---- bad input


class NotAWeight:
    """A pickled object that ``torch.load(weights_only=True)`` refuses."""


def test_missing_files_are_named(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(UserError) as e:
        convert_meta_checkpoint(tmp_path / "ckpt", tmp_path / "hf")
    msg = str(e.value)
    assert "consolidated.*.pth" in msg and "params.json" in msg and "tokenizer.model" in msg
    with pytest.raises(UserError, match="no such folder"):
        convert_meta_checkpoint(tmp_path / "nope", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_shard_gap_and_bad_files(tmp_path, llama3_ranks):
    model, _, meta_dir = llama3_checkpoint(tmp_path, llama3_ranks, n_shards=2)
    (meta_dir / "consolidated.01.pth").rename(meta_dir / "consolidated.02.pth")
    with pytest.raises(UserError, match=r"consolidated\.01\.pth"):
        convert_meta_checkpoint(meta_dir, tmp_path / "hf")
    (meta_dir / "consolidated.02.pth").rename(meta_dir / "consolidated.01.pth")

    # not loadable with weights_only=True (an arbitrary pickled object)
    good = (meta_dir / "consolidated.01.pth").read_bytes()
    torch.save({"x": NotAWeight()}, meta_dir / "consolidated.01.pth")
    with pytest.raises(UserError, match="weights_only=True"):
        convert_meta_checkpoint(meta_dir, tmp_path / "hf")
    (meta_dir / "consolidated.01.pth").write_bytes(good[: len(good) // 2])  # truncated download
    with pytest.raises(UserError, match="consolidated.01.pth"):
        convert_meta_checkpoint(meta_dir, tmp_path / "hf")
    (meta_dir / "consolidated.01.pth").write_bytes(good)

    (meta_dir / "params.json").write_text(json.dumps(llama3_params(len(llama3_ranks) + 256, n_kv_heads=4)))
    with pytest.raises(UserError, match=r"n_kv_heads=4.*does not match"):
        convert_meta_checkpoint(meta_dir, tmp_path / "hf")
    (meta_dir / "params.json").write_text(json.dumps(llama3_params(len(llama3_ranks) + 256, n_layers=3)))
    with pytest.raises(UserError, match="missing"):
        convert_meta_checkpoint(meta_dir, tmp_path / "hf")
    (meta_dir / "params.json").write_text(json.dumps(llama3_params(len(llama3_ranks) + 256, ffn_dim_multiplier=2.0)))
    with pytest.raises(UserError, match="MLP width"):
        convert_meta_checkpoint(meta_dir, tmp_path / "hf")
    (meta_dir / "params.json").write_text('{"dim": 64,')
    with pytest.raises(UserError, match="not valid JSON"):
        convert_meta_checkpoint(meta_dir, tmp_path / "hf")
    (meta_dir / "params.json").write_text('{"dim": 64, "n_layers": 2}')
    with pytest.raises(UserError, match="n_heads"):
        convert_meta_checkpoint(meta_dir, tmp_path / "hf")
    (meta_dir / "params.json").write_text(json.dumps(llama3_params(len(llama3_ranks) + 256)))
    (meta_dir / "tokenizer.model").write_text("not a tokenizer\n")
    with pytest.raises(UserError, match="neither a sentencepiece"):
        convert_meta_checkpoint(meta_dir, tmp_path / "hf")
    write_tiktoken(meta_dir / "tokenizer.model", llama3_ranks)
    with pytest.raises(UserError, match="sentencepiece tokenizer|tiktoken tokenizer"):
        convert_meta_checkpoint(meta_dir, tmp_path / "hf", llama_version="2")
    with pytest.raises(UserError, match="dtype"):
        convert_meta_checkpoint(meta_dir, tmp_path / "hf", dtype="int8")
    # nothing was left behind by the failures
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Meta-Llama-3-tiny"]

    convert_meta_checkpoint(meta_dir, tmp_path / "hf", llama_version="3")
    with pytest.raises(UserError, match="already holds a model .*--overwrite"):
        convert_meta_checkpoint(meta_dir, tmp_path / "hf")
    convert_meta_checkpoint(meta_dir, tmp_path / "hf", overwrite=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="not a model folder"):
        convert_meta_checkpoint(meta_dir, tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"
    (tmp_path / "notes" / "todo.txt").unlink()
    (tmp_path / "notes").rmdir()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Meta-Llama-3-tiny", "hf"]


def test_tokenizer_too_big_for_embeddings(tmp_path, llama3_ranks):
    _, _, meta_dir = llama3_checkpoint(tmp_path, llama3_ranks)
    bigger = dict(llama3_ranks)
    bigger[b"zzqq"] = len(bigger)
    write_tiktoken(meta_dir / "tokenizer.model", bigger)
    with pytest.raises(UserError, match="belongs to another model"):
        convert_meta_checkpoint(meta_dir, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_read_params_defaults(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps(
        {"dim": 4096, "multiple_of": 256, "n_heads": 32, "n_layers": 32, "norm_eps": 1e-05,
         "vocab_size": -1}))  # Llama 2 7B, verbatim
    p = read_params(tmp_path / "params.json")
    assert (p.n_kv_heads, p.rope_theta, p.vocab_size, p.ffn_dim_multiplier) == (32, 10000.0, -1, None)
    assert p.head_dim == 128


def test_tiktoken_file_errors(tmp_path):
    (tmp_path / "t.model").write_text("IQ== 0\nIg== 2\n")
    with pytest.raises(UserError, match="without gaps"):
        build_llama3_tokenizer(tmp_path / "t.model", "3")
    (tmp_path / "t.model").write_text("IQ== 0\n@@ x\n")
    with pytest.raises(UserError, match="line 2"):
        build_llama3_tokenizer(tmp_path / "t.model", "3")


def test_legacy_pickle_shard_loads_without_mmap(tmp_path):
    torch.save({"a": torch.ones(3)}, tmp_path / "old.pth", _use_new_zipfile_serialization=False)
    assert torch.equal(meta_mod.load_shard(tmp_path / "old.pth")["a"], torch.ones(3))

"""merge_adapter: LoRA / DoRA / QLoRA adapters folded into the base (tiny model, CPU, seconds)."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest
import torch

from instructkit.config import ModelConfig
from instructkit.errors import UserError
from instructkit.export import merge_adapter
from instructkit.export.merge import (
    FP4_CODE,
    NF4_CODE,
    _bnb_roundtrip,
    blockwise_4bit_roundtrip,
    dequantize_base_4bit,
    qlora_settings,
)
from instructkit.models import build_tiny_model, load_for_inference, save_final, tiny_tokenizer

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXTS = ["Hello there, how are you?", "<|im_start|>user\nName three colours.<|im_end|>\n"]


def _adapter_model(dora: bool, seed: int = 1, base=None):
    """A tiny Llama with a LoRA/DoRA adapter whose weights are all non-zero (B is random, and a
    DoRA magnitude is moved off its initial value, where DoRA would equal LoRA)."""
    from peft import LoraConfig, get_peft_model

    model = base if base is not None else build_tiny_model("tiny-llama")
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, use_dora=dora,
                     init_lora_weights=False, lora_dropout=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(model, cfg)
        for name, p in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.data.mul_(1 + 0.3 * torch.randn_like(p))
    return peft_model


def _ids(tok):
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


def _logits(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits.float()


@pytest.fixture
def adapter_dir(tmp_path):
    def make(dora: bool = False, name: str = "final"):
        tok = tiny_tokenizer()
        out = tmp_path / "run" / name
        out.parent.mkdir(exist_ok=True)
        save_final(_adapter_model(dora), tok, out, ModelConfig(name_or_path="tiny-llama"))
        return out

    return make


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_merged_logits_equal_adapter_logits(adapter_dir, tmp_path, dora):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = adapter_dir(dora)
    cfg = json.loads((src / "adapter_config.json").read_text())
    assert cfg["use_dora"] is dora
    adapted, tok = load_for_inference(src, dtype=torch.float32)
    ids, mask = _ids(tok)
    want = _logits(adapted, ids, mask)
    base = _logits(build_tiny_model("tiny-llama"), ids, mask)
    assert (want - base).abs().max() > 0.1  # the adapter does change the model

    out = merge_adapter(src, tmp_path / "merged")
    assert out == tmp_path / "merged"
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert not hasattr(merged, "peft_config")
    assert not any("lora" in k for k in merged.state_dict())
    got = _logits(merged, ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)

    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "tokenizer.json",
            "instructkit.json"} <= names
    assert not (tmp_path / "merged.tmp").exists()
    tok2 = AutoTokenizer.from_pretrained(str(out))
    assert tok2.chat_template == tok.chat_template and tok2.chat_template
    assert merged.generation_config.use_cache is True
    assert json.loads((out / "config.json").read_text())["use_cache"] is True
    assert 1023 in merged.generation_config.eos_token_id  # <|im_end|> still stops generation
    meta = json.loads((out / "instructkit.json").read_text())
    assert meta["kind"] == "full" and meta["adapter"] == ("dora" if dora else "lora")
    # the merged folder is a model like any other for the rest of instructkit
    again, _ = load_for_inference(out, dtype=torch.float32)
    torch.testing.assert_close(_logits(again, ids, mask), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype,torch_dtype,tol", [("bf16", torch.bfloat16, 0.05),
                                                    ("fp16", torch.float16, 5e-3)])
def test_merge_precision(adapter_dir, tmp_path, dtype, torch_dtype, tol):
    from transformers import AutoModelForCausalLM

    src = adapter_dir(False)
    adapted, tok = load_for_inference(src, dtype=torch.float32)
    ids, mask = _ids(tok)
    want = _logits(adapted, ids, mask)
    out = merge_adapter(src, tmp_path / "merged", dtype=dtype)
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert merged.model.layers[0].self_attn.q_proj.weight.dtype == torch_dtype
    got = _logits(merged.float(), ids, mask)
    assert (got - want).abs().max() < tol


def test_merge_replaces_a_model_folder_only_when_asked(adapter_dir, tmp_path):
    """A model already at output= is someone's: merging over it (which swaps the whole folder)
    is refused unless overwrite; a folder that holds no model is never replaced."""
    src = adapter_dir(False)
    out = tmp_path / "merged"
    merge_adapter(src, out)
    (out / "notes.txt").write_text("the user's")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(UserError, match="already holds a model .*--overwrite"):
        merge_adapter(src, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    merge_adapter(src, out, overwrite=True)
    assert not (out / "notes.txt").exists() and (out / "config.json").is_file()
    assert not (tmp_path / "merged.old").exists() and not (tmp_path / "merged.tmp").exists()
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("x")
    with pytest.raises(UserError, match="not a model folder"):
        merge_adapter(src, tmp_path / "docs", overwrite=True)
    assert [p.name for p in (tmp_path / "docs").iterdir()] == ["a.txt"]
    (tmp_path / "empty").mkdir()
    merge_adapter(src, tmp_path / "empty")  # an empty folder is fine


# --------------------------------------------------------------------------- bad input


def test_bad_dtype(adapter_dir, tmp_path):
    with pytest.raises(UserError, match="fp32, bf16, fp16"):
        merge_adapter(adapter_dir(False), tmp_path / "m", dtype="int4")


def test_not_an_adapter(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        merge_adapter(tmp_path / "nope", tmp_path / "m")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="not an adapter folder"):
        merge_adapter(tmp_path / "empty", tmp_path / "m")
    full = tmp_path / "full"
    build_tiny_model("tiny-llama").save_pretrained(str(full))
    with pytest.raises(UserError, match="full model, not an adapter"):
        merge_adapter(full, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_missing_base_folder(adapter_dir, tmp_path):
    src = adapter_dir(False)
    shutil.rmtree(src / "base")
    with pytest.raises(UserError, match=r"base model should be in .*base"):
        merge_adapter(src, tmp_path / "m")
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.tmp").exists()


def test_missing_base_model(tmp_path):
    base = tmp_path / "basemodel"
    build_tiny_model("tiny-llama").save_pretrained(str(base))
    tiny_tokenizer().save_pretrained(str(base))
    src = tmp_path / "run" / "final"
    src.parent.mkdir()
    save_final(_adapter_model(False), tiny_tokenizer(), src, ModelConfig(name_or_path=str(base)))
    assert not (src / "base").exists()  # a local base is referenced, not copied
    shutil.rmtree(base)
    with pytest.raises(UserError, match=f"cannot find the adapter's base model '{base}'"):
        merge_adapter(src, tmp_path / "m")


def test_output_that_is_not_a_model_is_kept(adapter_dir, tmp_path):
    src = adapter_dir(False)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a model folder"):
        merge_adapter(src, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="inside the adapter folder"):
        merge_adapter(src, src / "merged")


def test_failure_leaves_nothing_behind(adapter_dir, tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    src = adapter_dir(False)

    def boom(self, *a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", boom)
    with pytest.raises(OSError, match="disk full"):
        merge_adapter(src, tmp_path / "m")
    assert not (tmp_path / "m").exists()
    assert not (tmp_path / "m.tmp").exists()


# --------------------------------------------------------------------------- QLoRA


def test_blockwise_4bit_roundtrip_rounds_to_the_nearest_code():
    w = torch.tensor([[2.0, 1.0, -0.6, 0.17, 0.0, -2.0, 0.05, 1.3] * 8])  # one block of 64
    got = blockwise_4bit_roundtrip(w, "nf4")
    code = torch.tensor(NF4_CODE)
    scaled = w / 2.0
    nearest = code[(scaled.reshape(-1, 1) - code).abs().argmin(dim=1)].reshape(w.shape) * 2.0
    torch.testing.assert_close(got, nearest)
    assert got[0, 0] == 2.0 and got[0, 4] == 0.0  # the block maximum and zero are exact
    fp4 = blockwise_4bit_roundtrip(w, "fp4")
    assert set((fp4 / 2.0).flatten().tolist()) <= {float(torch.tensor(c)) for c in FP4_CODE}
    # blocks run across rows of the flattened weight; a partial last block works
    odd = torch.randn(7, 13)
    assert blockwise_4bit_roundtrip(odd, "nf4").shape == (7, 13)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes not installed")
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_torch_roundtrip_matches_bitsandbytes(quant_type):
    torch.manual_seed(0)
    for shape in [(128, 64), (96, 80), (7, 13)]:
        w = torch.randn(*shape) * 0.05
        ref = _bnb_roundtrip(w, quant_type, double_quant=False)
        if ref is None:
            pytest.skip("bitsandbytes cannot quantise on this machine")
        torch.testing.assert_close(blockwise_4bit_roundtrip(w, quant_type), ref)


def test_qlora_settings_from_the_run_config(adapter_dir):
    src = adapter_dir(False)
    assert qlora_settings(src) is None
    (src.parent / "config.yaml").write_text(
        "adapter:\n  kind: qlora\n  quant_type: fp4\n  double_quant: false\n")
    assert qlora_settings(src) == {"quant_type": "fp4", "double_quant": False}
    meta = json.loads((src / "instructkit.json").read_text())
    meta["adapter_kind"] = "lora"  # instructkit.json wins over the run config
    assert qlora_settings(src, meta) is None


def test_save_final_records_the_adapter_kind_for_merge(tmp_path):
    from instructkit.config import AdapterConfig

    src = tmp_path / "final"
    save_final(_adapter_model(False), tiny_tokenizer(), src, ModelConfig(name_or_path="tiny-llama"),
               AdapterConfig(kind="qlora", quant_type="fp4", double_quant=False))
    meta = json.loads((src / "instructkit.json").read_text())
    assert meta["adapter"]["kind"] == "qlora"
    # no run config.yaml next to the folder: the record alone tells merge
    assert qlora_settings(src) == {"quant_type": "fp4", "double_quant": False}
    save_final(_adapter_model(False), tiny_tokenizer(), src, ModelConfig(name_or_path="tiny-llama"),
               AdapterConfig(kind="lora"))
    assert qlora_settings(src) is None


def test_qlora_merges_into_the_dequantised_base(tmp_path):
    """A QLoRA adapter on a local full-precision base: merged into dequantize(quantize(W)),
    with a warning about the quality loss."""
    from transformers import AutoModelForCausalLM

    base = tmp_path / "basemodel"
    build_tiny_model("tiny-llama").save_pretrained(str(base))
    tiny_tokenizer().save_pretrained(str(base))
    src = tmp_path / "run" / "final"
    src.parent.mkdir()
    save_final(_adapter_model(False), tiny_tokenizer(), src, ModelConfig(name_or_path=str(base)))
    (src.parent / "config.yaml").write_text("adapter:\n  kind: qlora\n  quant_type: nf4\n")

    adapted, tok = load_for_inference(src, dtype=torch.float32)
    ids, mask = _ids(tok)
    full_precision = _logits(adapted, ids, mask)
    dequantize_base_4bit(adapted, "nf4", double_quant=False)
    want = _logits(adapted, ids, mask)
    q_weight = adapted.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    torch.testing.assert_close(q_weight, blockwise_4bit_roundtrip(q_weight, "nf4"))

    with pytest.warns(UserWarning, match="QLoRA adapter.*de-quantised.*quality loss"):
        out = merge_adapter(src, tmp_path / "merged", dtype="fp32")
    got = _logits(AutoModelForCausalLM.from_pretrained(str(out)), ids, mask)
    if importlib.util.find_spec("bitsandbytes") is None:  # the torch emulation: exact
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    else:  # bitsandbytes also compresses the block scales (double quantisation)
        assert (got - want).abs().max() < 0.05
    assert (got - full_precision).abs().max() > 1e-3  # not the full-precision base
    assert json.loads((out / "instructkit.json").read_text())["adapter"] == "qlora"


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                    reason="bitsandbytes not installed")
def test_adapter_on_a_base_stored_in_4bit(tmp_path):
    """A base checkpoint saved in 4 bit is de-quantised (transformers + bitsandbytes) and the
    adapter merged into it, with the QLoRA warning."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    full = tmp_path / "full"
    build_tiny_model("tiny-llama").save_pretrained(str(full))
    tiny_tokenizer().save_pretrained(str(full))
    try:
        q = AutoModelForCausalLM.from_pretrained(
            str(full), device_map={"": "cuda" if torch.cuda.is_available() else "cpu"},
            quantization_config=BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.float32))
    except Exception as e:  # no 4-bit backend on this machine
        pytest.skip(f"bitsandbytes cannot load in 4 bit here: {e}")
    base4 = tmp_path / "base4"
    q.save_pretrained(str(base4))
    tiny_tokenizer().save_pretrained(str(base4))
    src = tmp_path / "run" / "final"
    src.parent.mkdir()
    save_final(_adapter_model(False), tiny_tokenizer(), src, ModelConfig(name_or_path=str(base4)))

    from peft import PeftModel

    # the adapter on the full-precision base, its weights rounded to 4 bit like the stored base
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(full)), str(src))
    dequantize_base_4bit(adapted, "nf4", double_quant=True)
    tok = tiny_tokenizer()
    ids, mask = _ids(tok)
    want = _logits(adapted, ids, mask)
    with pytest.warns(UserWarning, match="4-bit base checkpoint de-quantised"):
        out = merge_adapter(src, tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(str(out))
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    torch.testing.assert_close(_logits(merged, ids, mask), want, atol=1e-5, rtol=0)

import json

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from instructkit.config import AdapterConfig, ModelConfig
from instructkit.models import (
    fix_pad_token,
    load_for_inference,
    load_model,
    load_tokenizer,
    save_final,
)


def perturb(model, scale=0.05, seed=0):
    """Move the trainable weights away from their init (LoRA B starts at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * scale)


def logits(model, x):
    model.eval()
    with torch.no_grad():
        return model(input_ids=x).logits


X = torch.tensor([[5, 17, 300, 41, 9, 1022, 77], [1, 2, 3, 4, 5, 6, 1021]])


def test_adapter_save_loads_with_peft_and_base_folder(tiny_model_cfg, tiny_tokenizer, tmp_path):
    model = load_model(tiny_model_cfg, AdapterConfig(kind="lora", r=4), tiny_tokenizer, "cpu")
    perturb(model)
    out = save_final(model, tiny_tokenizer, tmp_path / "final", tiny_model_cfg)
    assert (out / "adapter_model.safetensors").exists()
    assert (out / "base" / "model.safetensors").exists()
    assert not (tmp_path / "final.tmp").exists()
    base = AutoModelForCausalLM.from_pretrained(out / "base")
    loaded = PeftModel.from_pretrained(base, out)
    torch.testing.assert_close(logits(loaded, X), logits(model, X), rtol=0, atol=0)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == tiny_tokenizer.chat_template and len(tok) == len(tiny_tokenizer)
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["use_cache"] is True
    assert json.loads((out / "instructkit.json").read_text())["kind"] == "adapter"
    # training state was not disturbed by the save
    assert model.get_base_model().config.use_cache is False


def test_dora_adapter_round_trip(tiny_model_cfg, tiny_tokenizer, tmp_path):
    model = load_model(tiny_model_cfg, AdapterConfig(kind="dora", r=4), tiny_tokenizer, "cpu")
    perturb(model)
    out = save_final(model, tiny_tokenizer, tmp_path / "dora", tiny_model_cfg)
    loaded, tok = load_for_inference(out)
    torch.testing.assert_close(logits(loaded, X), logits(model, X))
    assert not loaded.training


def test_full_save_round_trip(tiny_model_cfg, tiny_tokenizer, tmp_path):
    model = load_model(tiny_model_cfg, None, tiny_tokenizer, "cpu")
    perturb(model)
    out = save_final(model, tiny_tokenizer, tmp_path / "full", tiny_model_cfg)
    assert (out / "model.safetensors").exists() and not (out / "base").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(logits(loaded, X), logits(model, X), rtol=0, atol=0)
    assert loaded.config.use_cache is True and loaded.generation_config.use_cache is True
    m2, tok = load_for_inference(out, device="cpu")
    torch.testing.assert_close(logits(m2, X), logits(model, X), rtol=0, atol=0)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_save_replaces_an_old_folder(tiny_model_cfg, tiny_tokenizer, tmp_path):
    model = load_model(tiny_model_cfg, None, tiny_tokenizer, "cpu")
    out = tmp_path / "final"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    save_final(model, tiny_tokenizer, out, tiny_model_cfg)
    assert not (out / "stale.txt").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_resized_vocab_adapter_round_trip(tmp_path, tiny_tokenizer):
    """A tokenizer that grew (pad added): base/ keeps the resized embeddings."""
    tiny_tokenizer.add_special_tokens({"additional_special_tokens": ["<|extra|>"]})
    cfg = ModelConfig(name_or_path="tiny-llama", device="cpu")
    model = load_model(cfg, AdapterConfig(kind="lora", r=2), tiny_tokenizer, "cpu")
    assert model.get_input_embeddings().weight.shape[0] == 1088
    perturb(model)
    out = save_final(model, tiny_tokenizer, tmp_path / "grown", cfg)
    loaded, tok = load_for_inference(out)
    assert len(tok) == 1025
    x = torch.tensor([[1, 2, 1024, 3]])
    torch.testing.assert_close(logits(loaded, x), logits(model, x), rtol=0, atol=0)


def test_adapter_without_base_folder_uses_the_recorded_base(tmp_path, tiny_tokenizer):
    """An adapter on a local HF folder records that folder; a reload rebuilds the resized
    vocabulary the same way."""
    from instructkit.models import build_tiny_model

    base_dir = tmp_path / "base-model"
    build_tiny_model(seed=5).save_pretrained(base_dir)
    tiny_tokenizer.save_pretrained(base_dir)
    cfg = ModelConfig(name_or_path=str(base_dir), device="cpu")
    tok = load_tokenizer(cfg)
    tok.pad_token = tok.eos_token
    tok.add_special_tokens({"additional_special_tokens": ["<|x|>"]})
    fix_pad_token(tok)
    model = load_model(cfg, AdapterConfig(kind="lora", r=2), tok, "cpu")
    perturb(model)
    out = save_final(model, tok, tmp_path / "adapter", cfg)
    assert not (out / "base").exists()
    loaded, _ = load_for_inference(out)
    torch.testing.assert_close(logits(loaded, X), logits(model, X), rtol=0, atol=0)


def test_load_for_inference_tiny_preset():
    model, tok = load_for_inference("tiny-llama")
    assert not model.training and model.generation_config.use_cache is True
    assert model.config.use_cache is True
    out = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= 2

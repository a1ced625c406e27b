#!/usr/bin/env python
"""Train the tiny byte-level BPE tokenizer that ships with instructkit.

The tokenizer backs the ``tiny-llama`` presets (random models for tests, demos and CPU smoke
runs). It is trained on text the project may ship: the first 300 KB of Tiny Shakespeare
(public domain) and the instructions and outputs of the Self-Instruct seed tasks
(Apache-2.0). Output: ``src/instructkit/assets/tiny_tokenizer/`` (tokenizer.json,
tokenizer_config.json, special_tokens_map.json, chat_template.jinja).

    python scripts/build_tiny_tokenizer.py [--data /work/shared/data] [--vocab-size 1024]

Training is deterministic for fixed inputs; rerun only when the recipe changes.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "src" / "instructkit" / "assets" / "tiny_tokenizer"

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
SPECIALS = [BOS, EOS, PAD, IM_START, IM_END]

# ChatML; a generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


README = """# Tiny tokenizer

Byte-level BPE, {vocab} tokens, for the `tiny-llama` presets (random models for tests and
demos). Built by `scripts/build_tiny_tokenizer.py` from the first 300 KB of Tiny Shakespeare
(public domain; karpathy/char-rnn) and the instructions and outputs of the Self-Instruct seed
tasks (Apache-2.0; yizhongw/self-instruct, data/seed_tasks.jsonl). Only the learned vocabulary
and merges ship here, not the text.

Special tokens: `<|begin_of_text|>` (BOS), `<|end_of_text|>` (EOS), `<|pad|>` (pad),
`<|im_start|>`, `<|im_end|>` (ChatML turns); they take the last ids. Encoding adds no BOS/EOS.
The chat template is ChatML with `add_generation_prompt` support.
"""


def corpus(data: Path, shakespeare_bytes: int = 300_000) -> list[str]:
    text = (data / "tinyshakespeare.txt").read_bytes()[:shakespeare_bytes].decode("utf-8", "ignore")
    lines = [p for p in text.split("\n\n") if p.strip()]
    with open(data / "selfinstruct_seed_tasks.jsonl", encoding="utf-8") as f:
        for raw in f:
            if not raw.strip():
                continue
            rec = json.loads(raw)
            lines.append(rec["instruction"])
            for inst in rec.get("instances", []):
                for key in ("input", "output"):
                    if inst.get(key):
                        lines.append(inst[key])
    return lines


def build(data: Path, vocab_size: int, out: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # No BOS/EOS added on encode (like SmolLM2 / ChatML models): templates place them.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(SPECIALS),  # the special tokens go at the end
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(data), trainer=trainer)
    tok.add_special_tokens(SPECIALS)

    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
        model_max_length=2048,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    fast.save_pretrained(out)
    (out / "README.md").write_text(README.format(vocab=len(fast)))
    print(f"saved {len(fast)} tokens to {out}")
    for p in sorted(out.iterdir()):
        print(f"  {p.name}: {p.stat().st_size} bytes")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("/work/shared/data"))
    ap.add_argument("--vocab-size", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    build(args.data, args.vocab_size, args.out)


if __name__ == "__main__":
    main()

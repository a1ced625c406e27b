"""Helpers for the data tests: a small trained byte-level BPE tokenizer with BOS/EOS/pad and
a ChatML-like chat template, built in memory in milliseconds (no download)."""

from __future__ import annotations

import functools

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "### Instruction:\nGive three tips for staying healthy.\n\n### Input:\nsome context\n\n### Response:\n",
    "Eat vegetables, sleep well and exercise every day.",
    "The capital of France is Paris. The capital of Italy is Rome.",
    "How can I find the best plan for my needs? Compare fees, options and other features.",
    "user assistant system hello world thanks you are a helpful assistant",
    "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak.",
    "0123456789 ,.;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`",
]

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# A template that closes a turn with no special token: EOS must be inserted after answers.
PLAIN = (
    "{% for m in messages %}{% if m['role'] == 'user' %}User: {{ m['content'] }}\n"
    "{% elif m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% else %}Assistant: {{ m['content'] }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


@functools.lru_cache(maxsize=None)
def _backend(vocab_size: int = 400) -> str:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    return tok.to_str()


def make_tokenizer(chat_template: str | None = CHATML, eos: str = "</s>", bos: bool = True):
    """A fresh PreTrainedTokenizerFast. ``bos=False``: the tokenizer adds no BOS itself."""
    backend = Tokenizer.from_str(_backend())
    if not bos:
        backend.post_processor = None
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token=eos,
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def decode_trained(tok, example: dict) -> str:
    """The text of the trained tokens (labels != -100), concatenated."""
    return tok.decode([t for t in example["labels"] if t != -100], skip_special_tokens=False)

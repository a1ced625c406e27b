"""Sampling responses from a causal LM (CLI `generate`, sample logging, evaluation)."""

from __future__ import annotations

import torch


def render_prompt(tokenizer, prompt: str, system_prompt: str | None = None, template: str = "auto") -> str:
    """The text the model sees before its answer: the chat template with a generation prompt,
    or the Alpaca prompt when the tokenizer has no chat template."""
    use_chat = template == "chat" or (template == "auto" and getattr(tokenizer, "chat_template", None))
    if use_chat:
        messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
            {"role": "user", "content": prompt}
        ]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    from instructkit.data.templates import alpaca_prompt

    return alpaca_prompt(prompt, "")


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 0,
    batch_size: int = 8,
    system_prompt: str | None = None,
    template: str = "auto",
    seed: int | None = None,
) -> list[str]:
    """Responses to ``prompts`` (left-padded batches, KV cache on). temperature 0 is greedy."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    if seed is not None:
        torch.manual_seed(seed)
    texts = [render_prompt(tokenizer, p, system_prompt, template) for p in prompts]
    eos = _stop_ids(tokenizer)
    out: list[str] = []
    try:
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            # The template already holds BOS where the model wants it.
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            sampling = temperature > 0
            kwargs = dict(
                max_new_tokens=max_new_tokens,
                do_sample=sampling,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
                use_cache=True,  # transformers 5 may inherit use_cache=False from training
            )
            if sampling:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k or None)
            ids = model.generate(**enc, **kwargs)
            new = ids[:, enc["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = old_side
        if was_training:
            model.train()
    return [o.strip() for o in out]


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    # Chat templates often end a turn with their own token (ChatML <|im_end|>, Llama-3 <|eot_id|>).
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)

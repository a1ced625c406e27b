"""Sampling responses from a causal LM (CLI `generate`, sample logging, evaluation)."""

from __future__ import annotations

import torch

from instructkit.engine import distributed as D


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
    if seed is not None:
        torch.manual_seed(seed)
    from instructkit.data import build_prompt_ids

    # The same rendering as in training, cut where the answer starts.
    prompt_ids = [build_prompt_ids(p, tokenizer, template, system_prompt) for p in prompts]
    eos = _stop_ids(tokenizer)
    out: list[str] = []
    try:
        for i in range(0, len(prompt_ids), batch_size):
            enc = left_pad(prompt_ids[i : i + batch_size], tokenizer.pad_token_id, device)
            sampling = temperature > 0
            kwargs = dict(
                max_new_tokens=max_new_tokens,
                do_sample=sampling,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos,
                use_cache=True,  # transformers 5 may inherit use_cache=False from training
            )
            if sampling:
                # top_k=0 must be explicit: None would fall back to the default of 50
                kwargs.update(temperature=temperature, top_p=top_p, top_k=top_k)
            # Through the distributed root when sharded; synced: ranks stop together.
            ids = D.through(model, _generate, enc, dict(kwargs, synced_gpus=D.active()))
            new = ids[:, enc["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        if was_training:
            model.train()
    return [o.strip() for o in out]


def _generate(model, enc: dict, kwargs: dict) -> torch.Tensor:
    return model.generate(**enc, **kwargs)


def _stop_ids(tokenizer) -> list[int]:
    ids = {tokenizer.eos_token_id}
    # Chat templates often end a turn with their own token (ChatML <|im_end|>, Llama-3 <|eot_id|>).
    for tok in ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return sorted(i for i in ids if i is not None)


def left_pad(seqs: list[list[int]], pad_id: int, device) -> dict:
    """Left-padded input_ids and attention_mask, so every prompt ends where generation starts."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}

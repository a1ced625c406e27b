"""Sampling responses from a causal LM (CLI `generate`, sample logging, evaluation)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from instructkit.engine import distributed as D
from instructkit.errors import UserError


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
    """Responses to ``prompts`` (left-padded batches, KV cache on). temperature 0 is greedy.
    ``model``: a plain model, or a stage's :class:`~instructkit.engine.distributed.Wrapped`
    (every rank takes part under torchrun)."""
    run = D.wrapped(model)
    model = run.module
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if seed is not None:
        torch.manual_seed(seed)
    from instructkit.data import build_prompt_ids

    # The same rendering as in training, cut where the answer starts.
    prompt_ids = [build_prompt_ids(p, tokenizer, template, system_prompt) for p in prompts]
    eos = stop_token_ids(tokenizer, model, template)
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
            ids = run(_generate, enc, dict(kwargs, synced_gpus=D.active()))
            new = ids[:, enc["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        if was_training:
            model.train()
    return [o.strip() for o in out]


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, batch_size: int = 1) -> None:
    """The sampling settings of ``generate`` and ``chat``, checked before a model loads; a bad
    one is a UserError naming the flag."""
    import math

    checks = (("--max-new-tokens", max_new_tokens, max_new_tokens >= 1, "at least 1"),
              ("--temperature", temperature, math.isfinite(temperature) and temperature >= 0, "0 (greedy) or above"),
              ("--top-p", top_p, 0 < top_p <= 1, "above 0 and at most 1"),
              ("--batch-size", batch_size, batch_size >= 1, "at least 1"))
    for flag, value, ok, want in checks:
        if not ok:
            raise UserError(f"{flag} {value:g}: must be {want}")


def _generate(model, enc: dict, kwargs: dict) -> torch.Tensor:
    return model.generate(**enc, **kwargs)


def stop_token_ids(
    tokenizer,
    model=None,
    template: str = "auto",
    override: Sequence[int | str] | None = None,
) -> list[int]:
    """The token ids that end a generated answer: the one stop set of PPO rollouts, ``generate``,
    evaluation samples, chat and the local judge.

    The union of the model's ``generation_config.eos_token_id`` (an int or a list), the
    tokenizer's EOS, and the token the template puts after an assistant answer
    (:func:`instructkit.data.templates.end_of_turn_id`: ``<|im_end|>``, ``<|eot_id|>``, Gemma's
    ``<end_of_turn>``, Phi-3's ``<|end|>``, ...). ``override`` (token ids, or token strings that
    are single tokens of the vocabulary) replaces the derived set. Sorted ids; a ValueError
    when nothing is left (no EOS anywhere) or an override string is not one token.
    """
    if override:
        return sorted({_one_token_id(tokenizer, t) for t in override})
    from instructkit.data.templates import end_of_turn_id

    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update([gen_eos] if isinstance(gen_eos, int) else list(gen_eos or []))
    if isinstance(tokenizer.eos_token_id, int):
        ids.add(tokenizer.eos_token_id)
    eot = end_of_turn_id(tokenizer, template)
    if eot is not None:
        ids.add(eot)
    if not ids:
        raise ValueError("no stop token: the tokenizer has no EOS and the template closes no turn")
    return sorted(ids)


def _one_token_id(tokenizer, token: int | str) -> int:
    if isinstance(token, int) and not isinstance(token, bool):
        if not 0 <= token < len(tokenizer):
            raise ValueError(f"stop token id {token} is outside the vocabulary (0..{len(tokenizer) - 1})")
        return token
    ids = tokenizer.encode(str(token), add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"stop string {token!r} is {len(ids)} tokens, not one: a response ends at a token (its "
            "log-probs and the reward are read per token), so give a single token or its id"
        )
    return ids[0]


def left_pad(seqs: list[list[int]], pad_id: int, device) -> dict:
    """Left-padded input_ids and attention_mask, so every prompt ends where generation starts."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[r, width - len(s) :] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def log_samples(model, tokenizer, cfg, step: int, out, logger) -> None:
    """Greedy answers to ``cfg.log.generation_prompts`` (rendered as ``cfg.data`` says), to
    TensorBoard and ``out/samples.jsonl``: SFT and DPO every ``log.generation_freq`` steps."""
    import json

    prompts = cfg.log.generation_prompts
    responses = generate_responses(  # every rank takes part (a sharded model); rank 0 writes
        model, tokenizer, prompts, max_new_tokens=cfg.log.generation_max_new_tokens,
        temperature=0.0, system_prompt=cfg.data.system_prompt, template=cfg.data.template,
    )
    if not D.is_main():
        return
    with open(out / "samples.jsonl", "a") as f:
        for p, r in zip(prompts, responses):
            f.write(json.dumps({"step": step, "prompt": p, "response": r}) + "\n")
    logger.text(step, "samples", "\n\n".join(f"**{p}**\n\n{r}" for p, r in zip(prompts, responses)))

"""Sampling responses from a causal LM (CLI `generate`, sample logging, evaluation)."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from instructkit.engine import distributed as D
from instructkit.errors import UserError

log = logging.getLogger(__name__)


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
    repetition_penalty: float = 1.0,
) -> list[str]:
    """Responses to ``prompts`` (left-padded batches, KV cache on). temperature 0 is greedy.
    ``model``: a plain model, or a stage's :class:`~instructkit.engine.distributed.Wrapped`
    (every rank takes part under torchrun)."""
    from instructkit.data import build_prompt_ids

    module = D.wrapped(model).module
    if seed is not None:
        torch.manual_seed(seed)
    # The same rendering as in training, cut where the answer starts.
    prompt_ids = [build_prompt_ids(p, tokenizer, template, system_prompt) for p in prompts]
    kwargs = generation_kwargs(
        module, tokenizer, stop_token_ids(tokenizer, module, template), max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, top_k=top_k, repetition_penalty=repetition_penalty,
        synced_gpus=D.active(),  # a sharded model: ranks step together until all are done
    )
    device = next(module.parameters()).device
    out: list[str] = []
    for i in range(0, len(prompt_ids), batch_size):
        enc = left_pad(prompt_ids[i : i + batch_size], kwargs["pad_token_id"], device)
        new = generate_tokens(model, enc, kwargs)
        out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    return [o.strip() for o in out]


def check_sampling(max_new_tokens: int, temperature: float, top_p: float, batch_size: int = 1,
                   top_k: int = 0, repetition_penalty: float = 1.0) -> None:
    """The sampling settings of ``generate`` and ``chat``, checked before a model loads; a bad
    one is a UserError naming the flag."""
    import math

    checks = (("--max-new-tokens", max_new_tokens, max_new_tokens >= 1, "at least 1"),
              ("--temperature", temperature, math.isfinite(temperature) and temperature >= 0, "0 (greedy) or above"),
              ("--top-p", top_p, 0 < top_p <= 1, "above 0 and at most 1"),
              ("--top-k", top_k, top_k >= 0, "0 (off) or above"),
              ("--repetition-penalty", repetition_penalty,
               math.isfinite(repetition_penalty) and repetition_penalty > 0, "above 0 (1: off)"),
              ("--batch-size", batch_size, batch_size >= 1, "at least 1"))
    for flag, value, ok, want in checks:
        if not ok:
            raise UserError(f"{flag} {value:g}: must be {want}")


# Generation-config fields (left None by default) that would change what is generated if a
# checkpoint's generation_config.json set them, and that an explicit argument cannot unset.
_UNNEUTRALISED = (
    "min_p",
    "top_h",
    "bad_words_ids",
    "sequence_bias",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "exponential_decay_length_penalty",
    "guidance_scale",
    "watermarking_config",
    "min_new_tokens",
)


def generation_kwargs(
    model,
    tokenizer,
    stop_ids: Sequence[int],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    synced_gpus: bool = False,
) -> dict:
    """The keyword arguments of every ``model.generate`` call in instructkit (``generate``,
    chat, evaluation samples, the local judge, RL rollouts): temperature 0 is greedy.

    Every logits processor that a checkpoint's ``generation_config.json`` could switch on is
    given explicitly, so what is generated is what these settings say and nothing the
    checkpoint's author chose (a ``repetition_penalty`` of 1.3 in a downloaded model would
    otherwise apply silently, and would put RL's log-prob ratios off). Fields that cannot be
    unset by an argument (:data:`_UNNEUTRALISED`) are warned about. ``top_k`` 0 and ``top_p`` 1
    disable those cuts."""
    kwargs = dict(
        max_new_tokens=int(max_new_tokens),
        do_sample=temperature > 0,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0],
        eos_token_id=list(stop_ids),
        use_cache=True,  # transformers 5 may inherit use_cache=False from training
        synced_gpus=synced_gpus,
        repetition_penalty=float(repetition_penalty),
        no_repeat_ngram_size=0,
        min_length=0,
        num_beams=1,
        num_return_sequences=1,
        renormalize_logits=False,
    )
    if temperature > 0:
        kwargs.update(temperature=float(temperature), top_p=float(top_p),
                      top_k=int(top_k),  # 0 disables (None would fall back to transformers' default 50)
                      typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0)
    gen_cfg = getattr(model, "generation_config", None)
    extra = [f for f in _UNNEUTRALISED if gen_cfg is not None and not _neutral(f, getattr(gen_cfg, f, None))]
    if extra:
        log.warning("the model's generation_config sets %s, which still applies: generation is not what "
                    "its settings say (and RL's log-prob ratios are off); clear these fields", ", ".join(extra))
    return kwargs


def _neutral(field: str, value) -> bool:
    if field == "guidance_scale":
        return value is None or value == 1
    return value is None or value == [] or value == 0 or value is False


def generate_tokens(model, enc: dict, kwargs: dict) -> torch.Tensor:
    """The one call of HF ``generate``: the new token ids [B, T_new] after the prompts ``enc``
    (``input_ids`` / ``attention_mask`` [B, P], left-padded), with :func:`generation_kwargs`
    (plus a ``streamer`` where one is wanted). ``model``: a plain model or a
    :class:`~instructkit.engine.distributed.Wrapped` (through its distributed root). The model
    is in eval mode while it generates and back in its former mode after; no gradients."""
    run = D.wrapped(model)
    was_training = run.module.training
    run.module.eval()
    try:
        with torch.no_grad():
            ids = run(_generate, enc, kwargs)
    finally:
        if was_training:
            run.module.train()
    return ids[:, enc["input_ids"].shape[1] :]


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

"""PPO rollouts: sample responses to prompts, then score them and compute the per-token
log-probs and values that ``instructkit.losses.rl`` turns into rewards and advantages.

Layout of a :class:`RolloutBatch` (``B`` rows, ``P`` prompt columns, ``T`` response columns)::

    full_ids  = [ pad pad p0 p1 p2 | r0 r1 EOS pad ]   prompt left-, response right-padded
    full_mask = [  0   0  1  1  1  |  1  1  1   0  ]   response part = response_mask
    position  = [  0   0  0  1  2  |  3  4  5   5  ]   from the mask (RoPE sees no padding)

The logit that predicts response token ``t`` sits at column ``P - 1 + t`` of ``full_ids`` (the
last prompt token predicts ``r0``), and so does the value of the state before ``r_t``:
:func:`response_slice` is the one place where that shift is written.

The reward model scores the sequence at its last real token: the first EOS when the response
reached one, else the last sampled token (``full_mask`` is cut after the EOS).

The reward model and the value model must share the policy's tokenizer (they read
``full_ids``); a function reward reads decoded texts instead.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import math
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from instructkit.errors import UserError, snippet
from instructkit.generate import generate_tokens, generation_kwargs, left_pad, stop_token_ids
from instructkit.losses.sft import IGNORE_INDEX, token_logprobs
from instructkit.models.adapters import unwrap
from instructkit.models.heads import backbone, position_ids_from_mask, reward_scores, score_head
from instructkit.losses.rl import entropy_from_logits

log = logging.getLogger("instructkit.rollout")

__all__ = [
    "RolloutBatch",
    "build_batch",
    "concat_batches",
    "forward_response_logprobs",
    "forward_response_values",
    "function_scores",
    "load_reward_function",
    "response_logprobs",
    "response_mask_from_ids",
    "response_slice",
    "response_values",
    "reward_model_scores",
    "reward_fields",
    "sample",
    "score_responses",
    "token_values",
]


# --------------------------------------------------------------------------- the batch


@dataclass
class RolloutBatch:
    """Prompts and sampled responses (all tensors on one device).

    prompt_ids, prompt_mask: [B, P] left-padded. response_ids: [B, T] (pad after the first
    EOS); response_mask: [B, T], 1 up to and including the first EOS, 0 after (a response
    without EOS is all ones up to its last sampled token); reached_eos: [B] bool.
    full_ids, full_mask, position_ids: [B, P + T] (prompt then response; positions counted
    from full_mask). prompts, responses: the texts (responses decoded up to, not including,
    the EOS, special tokens skipped, stripped).
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    reached_eos: torch.Tensor
    full_ids: torch.Tensor
    full_mask: torch.Tensor
    position_ids: torch.Tensor
    prompts: list[str]
    responses: list[str]

    def __len__(self) -> int:
        return self.prompt_ids.shape[0]

    @property
    def prompt_len(self) -> int:
        """P: prompt columns (with left padding)."""
        return self.prompt_ids.shape[1]

    @property
    def response_len(self) -> int:
        """T: response columns."""
        return self.response_ids.shape[1]

    def select(self, rows: slice | Sequence[int] | torch.Tensor) -> RolloutBatch:
        """The batch of the given rows (a slice, a list of indices or a long tensor)."""
        if isinstance(rows, slice):
            idx = list(range(len(self)))[rows]
        elif torch.is_tensor(rows):
            idx = [int(i) for i in rows.tolist()]
        else:
            idx = [int(i) for i in rows]
        index = torch.tensor(idx, dtype=torch.long, device=self.prompt_ids.device)
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            values[f.name] = v.index_select(0, index) if torch.is_tensor(v) else [v[i] for i in idx]
        return RolloutBatch(**values)

    def micro_batches(self, size: int):
        """Consecutive row blocks of at most ``size`` rows."""
        if size < 1:
            raise ValueError(f"micro_batch_size must be >= 1, got {size}")
        for start in range(0, len(self), size):
            yield self.select(slice(start, start + size))

    def to(self, device) -> RolloutBatch:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for k, v in values.items():
            if torch.is_tensor(v):
                values[k] = v.to(device)
        return RolloutBatch(**values)


def concat_batches(batches: Sequence[RolloutBatch], pad_id: int) -> RolloutBatch:
    """The rows of ``batches`` in order as one batch: prompts left-padded and responses
    right-padded to the widest (masks 0 and ``pad_id`` in the new columns), positions counted
    again from the masks, so every row's real tokens and positions are what they were."""
    P = max(b.prompt_len for b in batches)
    T = max(b.response_len for b in batches)

    def cat(name: str, width: int, left: bool, value: int) -> torch.Tensor:
        xs = [getattr(b, name) for b in batches]
        return torch.cat([torch.nn.functional.pad(x, (width - x.shape[1], 0) if left else (0, width - x.shape[1]),
                                                  value=value) for x in xs])

    p_ids, p_mask = cat("prompt_ids", P, True, pad_id), cat("prompt_mask", P, True, 0)
    r_ids, r_mask = cat("response_ids", T, False, pad_id), cat("response_mask", T, False, 0)
    full_mask = torch.cat([p_mask, r_mask], dim=1)
    return RolloutBatch(
        prompt_ids=p_ids, prompt_mask=p_mask, response_ids=r_ids, response_mask=r_mask,
        reached_eos=torch.cat([b.reached_eos for b in batches]), full_ids=torch.cat([p_ids, r_ids], dim=1),
        full_mask=full_mask, position_ids=position_ids_from_mask(full_mask),
        prompts=[p for b in batches for p in b.prompts], responses=[r for b in batches for r in b.responses],
    )


def response_mask_from_ids(
    response_ids: torch.Tensor, stop_ids: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask of each response up to and including its first stop token.

    response_ids: [B, T] as sampled (whatever follows the first stop token: pad or garbage);
    stop_ids: the EOS / end-of-turn ids. Returns ``(mask [B, T] long, reached_eos [B] bool)``;
    a row without a stop token is all ones. Token ids after the stop do not matter (pad ==
    eos works); a pad id sampled before the stop is a real token of the response.
    """
    stops = torch.as_tensor(list(stop_ids), dtype=response_ids.dtype, device=response_ids.device)
    is_stop = torch.isin(response_ids, stops).long()  # [B, T]
    stops_before = is_stop.cumsum(1) - is_stop  # stop tokens strictly before t
    mask = (stops_before == 0).long()
    return mask, is_stop.any(1)


def build_batch(
    tokenizer,
    prompt_ids: list[list[int]] | tuple[torch.Tensor, torch.Tensor],
    response_ids: torch.Tensor,
    stop_ids: Sequence[int] | None = None,
    prompts: list[str] | None = None,
) -> RolloutBatch:
    """A :class:`RolloutBatch` from prompts and raw sampled responses.

    prompt_ids: lists of ids (left-padded here) or an already left-padded ``(ids, mask)``
    pair [B, P]; response_ids: [B, T] on the same device; stop_ids: default
    :func:`instructkit.generate.stop_token_ids` of the tokenizer. Tokens after the first stop are replaced by the pad id.
    prompts: the prompt texts to keep (default: decoded prompt ids, special tokens skipped).
    """
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token (use instructkit's fix_pad_token)")
    stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer)
    if isinstance(prompt_ids, tuple):
        p_ids, p_mask = prompt_ids
    else:
        enc = left_pad(prompt_ids, pad_id, response_ids.device)
        p_ids, p_mask = enc["input_ids"], enc["attention_mask"]
    if p_ids.shape[0] != response_ids.shape[0]:
        raise ValueError(f"{p_ids.shape[0]} prompts but {response_ids.shape[0]} responses")
    r_mask, reached = response_mask_from_ids(response_ids, stop_ids)
    r_ids = response_ids.masked_fill(r_mask == 0, pad_id)
    full_mask = torch.cat([p_mask.long(), r_mask], dim=1)
    if prompts is None:
        prompts = tokenizer.batch_decode(
            [row[m.bool()].tolist() for row, m in zip(p_ids, p_mask)], skip_special_tokens=True
        )
    responses = tokenizer.batch_decode(
        [row[m.bool()].tolist() for row, m in zip(r_ids, r_mask)], skip_special_tokens=True
    )
    return RolloutBatch(
        prompt_ids=p_ids,
        prompt_mask=p_mask.long(),
        response_ids=r_ids,
        response_mask=r_mask,
        reached_eos=reached,
        full_ids=torch.cat([p_ids, r_ids], dim=1),
        full_mask=full_mask,
        position_ids=position_ids_from_mask(full_mask),
        prompts=list(prompts),
        responses=[r.strip() for r in responses],
    )


# --------------------------------------------------------------------------- sampling

@contextmanager
def _seeded(seed: int | None, device: torch.device):
    """Seed the RNGs for the block and restore them after (CPU and CUDA)."""
    if seed is None:
        yield
        return
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def sample(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    *,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_ids: Sequence[int] | None = None,
    seed: int | None = None,
    batch_size: int | None = None,
    prompts: list[str] | None = None,
    synced_gpus: bool = False,
) -> RolloutBatch:
    """Sample one response per prompt with HF ``generate`` (KV cache on), in left-padded
    batches of ``batch_size`` rows (default: all at once).

    prompt_ids: token ids of each prompt (``instructkit.data.build_prompt_ids``); stop_ids:
    default :func:`instructkit.generate.stop_token_ids` of the tokenizer and model. temperature > 0; top_k 0 and top_p 1
    disable those cuts. seed: sample from this seed and leave the global RNG as it was (None:
    use the global RNG). synced_gpus: every rank keeps stepping until all are done (a sharded
    model needs every rank in every forward). Works with peft models. The model is in eval mode while sampling and
    back in its former mode after. Returns a :class:`RolloutBatch` on the model's device.
    """
    if not temperature > 0:
        raise ValueError(f"PPO samples: temperature must be > 0, got {temperature}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise ValueError("every prompt needs at least one token")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token (use instructkit's fix_pad_token)")
    stop_ids = list(stop_ids) if stop_ids is not None else stop_token_ids(tokenizer, model)
    device = next(model.parameters()).device
    enc = left_pad(prompt_ids, pad_id, device)
    p_ids, p_mask = enc["input_ids"], enc["attention_mask"]
    # What PPO computes is softmax(logits / temperature) over the full vocabulary (the old,
    # reference and new log-probs, as in TRL and OpenRLHF): with top_k 0 and top_p 1 (the
    # defaults) the tokens are drawn from exactly that and the first epoch's ratio is 1; with a
    # cut they come from a renormalised sub-vocabulary, a small off-policy bias.
    kwargs = generation_kwargs(model, tokenizer, stop_ids, max_new_tokens=max_new_tokens,
                               temperature=temperature, top_p=top_p, top_k=top_k, synced_gpus=synced_gpus)
    size = batch_size or len(prompt_ids)
    chunks: list[torch.Tensor] = []
    with _seeded(seed, device):
        for start in range(0, len(prompt_ids), size):
            ids = p_ids[start : start + size]
            mask = p_mask[start : start + size]
            lead = int((mask.sum(0) == 0).sum())  # columns that are padding in every row
            chunks.append(generate_tokens(model, {"input_ids": ids[:, lead:], "attention_mask": mask[:, lead:]}, kwargs))
    width = max(c.shape[1] for c in chunks)
    response_ids = torch.cat(
        [torch.nn.functional.pad(c, (0, width - c.shape[1]), value=pad_id) for c in chunks]
    )
    return build_batch(tokenizer, (p_ids, p_mask), response_ids, stop_ids, prompts)


# --------------------------------------------------------------------------- forward passes


def response_slice(x: torch.Tensor, P: int, T: int) -> torch.Tensor:
    """The entries of ``x`` that belong to the response tokens: ``x[:, P - 1 : P - 1 + T]``.

    x: [B, P + T, ...] per-position outputs of a forward pass over ``full_ids`` (logits,
    values). The output at column ``P - 1 + t`` is computed from the tokens up to the one just
    before response token ``t``: it is the logit that predicts ``r_t`` and the value of the
    state in which ``r_t`` is chosen. The last column (after the last response token) is not
    used. Returns [B, T, ...].
    """
    if P < 1:
        raise ValueError("the prompt must have at least one column")
    return x[:, P - 1 : P - 1 + T]


def _compact(batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """``(ids, mask, positions, P', T')`` of the batch without the prompt columns that are
    padding in every row and the response columns past every row's end (their outputs are
    masked anyway; dropping them saves compute)."""
    lead = int((batch.prompt_mask.sum(0) == 0).sum())
    t = max(int(batch.response_mask.sum(1).max()), 1) if len(batch) else 1
    end = batch.prompt_len + t
    return (
        batch.full_ids[:, lead:end],
        batch.full_mask[:, lead:end],
        batch.position_ids[:, lead:end],
        batch.prompt_len - lead,
        t,
    )


def _pad_to(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B, t] -> [B, T] with zeros on the right."""
    return torch.nn.functional.pad(x, (0, T - x.shape[1]))


def _accepts_logits_to_keep(model) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(unwrap(model).forward).parameters
    except (TypeError, ValueError):  # pragma: no cover - exotic wrappers
        return False


def forward_response_logprobs(
    model, batch: RolloutBatch, temperature: float = 1.0, with_entropy: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of the response tokens under ``model`` (with gradient: the policy update;
    pass a micro-batch), with the logits divided by ``temperature`` as when sampling.

    Returns ``(logp [B, T], entropy [B, T] or None)`` fp32, 0 where the response mask is 0.
    The model's train/eval mode is the caller's (turn dropout off for PPO).
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    ids, mask, pos, P, t = _compact(batch)
    extra = {}
    if _accepts_logits_to_keep(model):
        # keep only the columns P-1 .. P+t-1: the last t+1 of the sequence
        extra["logits_to_keep"] = t + 1
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **extra)
    logits = out.logits if hasattr(out, "logits") else out[0]
    # In the kept columns the prompt's last token is column 0: slice as if P were 1.
    logits = response_slice(logits, 1 if extra else P, t).float() / temperature  # [B, t, V]
    r_mask = batch.response_mask[:, :t]
    targets = batch.response_ids[:, :t].masked_fill(r_mask == 0, IGNORE_INDEX)
    logp = _pad_to(token_logprobs(logits, targets), batch.response_len)
    entropy = None
    if with_entropy:
        entropy = _pad_to(entropy_from_logits(logits) * r_mask, batch.response_len)
    return logp, entropy


@torch.no_grad()
def response_logprobs(
    model, batch: RolloutBatch, micro_batch_size: int, temperature: float = 1.0
) -> torch.Tensor:
    """Log-probs of the response tokens (no gradient: old policy and reference log-probs),
    computed in micro-batches with the model in eval mode (restored after).

    Returns [B, T] fp32, 0 where the response mask is 0.
    """
    was_training = model.training
    model.eval()
    try:
        parts = [
            forward_response_logprobs(model, mb, temperature)[0]
            for mb in batch.micro_batches(micro_batch_size)
        ]
    finally:
        if was_training:
            model.train()
    return torch.cat(parts)


ValueFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def token_values(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    position_ids: torch.Tensor,
) -> torch.Tensor:
    """Per-position values of a value model built like the reward model (a decoder with a
    scalar ``score`` head, e.g. initialised from it): the head on every hidden state.

    input_ids, attention_mask, position_ids: [B, L]. Returns [B, L] fp32. Use as
    ``value_model_fn=functools.partial(token_values, value_model)``.
    """
    out = backbone(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    )
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    return score_head(model)(hidden).squeeze(-1).float()


def forward_response_values(value_model_fn: ValueFn, batch: RolloutBatch) -> torch.Tensor:
    """Values of the states before each response token, with gradient (the value update).

    value_model_fn(full_ids, full_mask, position_ids) -> [B, L] per-position values. Returns
    [B, T] fp32: the output at column ``P - 1 + t`` for token ``t`` (:func:`response_slice`),
    0 where the response mask is 0.
    """
    ids, mask, pos, P, t = _compact(batch)
    values = response_slice(value_model_fn(ids, mask, pos), P, t).float()
    return _pad_to(values * batch.response_mask[:, :t], batch.response_len)


@torch.no_grad()
def response_values(
    value_model_fn: ValueFn, batch: RolloutBatch, micro_batch_size: int
) -> torch.Tensor:
    """:func:`forward_response_values` without gradient, in micro-batches. [B, T] fp32.
    (Put the value model in eval mode first if it has dropout.)"""
    micro = batch.micro_batches(micro_batch_size)
    return torch.cat([forward_response_values(value_model_fn, mb) for mb in micro])


# --------------------------------------------------------------------------- scores


@torch.no_grad()
def reward_model_scores(
    model: nn.Module, batch: RolloutBatch, micro_batch_size: int
) -> torch.Tensor:
    """Reward model scores of the responses: the head at the last real token of
    ``full_mask`` (the first EOS, or the last sampled token), via
    :func:`instructkit.models.heads.reward_scores`, in micro-batches, eval mode (restored
    after). Returns [B] fp32 (raw: normalise with ``rl.normalize_scores``)."""
    was_training = model.training
    model.eval()
    try:
        parts = []
        for mb in batch.micro_batches(micro_batch_size):
            ids, mask, pos, _, _ = _compact(mb)
            parts.append(reward_scores(model, ids, mask, pos))
    finally:
        if was_training:
            model.train()
    return torch.cat(parts)


def function_scores(fn: Callable, batch: RolloutBatch, fields: dict[str, list] | None = None) -> torch.Tensor:
    """Scores from a Python reward function ``fn(prompts, responses, **fields) -> list[float]``
    called once with the batch's texts (and ``fields``: name -> one value per response).
    Returns [B] fp32 on the batch's device. A wrong length or a non-finite / non-numeric value
    is a UserError naming the function."""
    name = getattr(fn, "__qualname__", None) or getattr(getattr(fn, "func", None), "__qualname__", None) or repr(fn)
    fields = fields or {}
    try:
        out = fn(list(batch.prompts), list(batch.responses), **fields)
    except Exception as e:  # the user's code: say where and on what, not a traceback
        raise UserError(_reward_failure(fn, name, e, list(batch.prompts), list(batch.responses), fields)) from None
    try:
        values = [float(v) for v in out]
    except (TypeError, ValueError) as e:
        raise UserError(f"reward function {name} must return a list of numbers: {e}") from None
    if len(values) != len(batch):
        raise UserError(
            f"reward function {name} returned {len(values)} scores for {len(batch)} responses"
        )
    bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        raise UserError(f"reward function {name} returned non-finite scores at {bad[:5]}")
    return torch.tensor(values, dtype=torch.float32, device=batch.prompt_ids.device)


def _reward_failure(fn: Callable, name: str, e: Exception, prompts: list[str], responses: list[str],
                    fields: dict[str, list]) -> str:
    """What a raising reward function failed on: the first response that fails alone (the
    function is called again one response at a time to find it), and where in its code."""
    frame = traceback.extract_tb(e.__traceback__)[-1]
    what = f"reward function {name} raised {type(e).__name__}: {e} (at {Path(frame.filename).name}:{frame.lineno})"
    for i, (p, r) in enumerate(zip(prompts, responses)):
        try:
            fn([p], [r], **{k: v[i:i + 1] for k, v in fields.items()})
        except Exception:  # noqa: BLE001 - looking for the input it fails on
            return f"{what} on response {i} of the batch; prompt: {snippet(p, 120)}; response: {snippet(r, 120)}"
    return f"{what} on the batch of {len(responses)} responses (each alone scores without error)"


def reward_fields(fn: Callable, spec: str, available: set[str], fixed: dict) -> list[str]:
    """The record fields to pass to reward function ``fn`` (named ``spec`` in messages): its
    parameters after (prompts, responses) that the prompt records have, or all of them for a
    ``**kwargs`` function; ``fixed`` are the keyword settings the config gives. A parameter
    without a default that neither provides is a UserError, before any sampling."""
    import inspect

    try:
        params = list(inspect.signature(fn).parameters.values())[2:]
    except (TypeError, ValueError):  # a builtin or C callable: pass no fields
        return []
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(fixed) - set(names)) if not any(p.kind == p.VAR_KEYWORD for p in params) else []
    if unknown:
        raise UserError(f"reward function {spec}: kwargs {unknown} are not parameters of it (it takes {names})")
    if any(p.kind == p.VAR_KEYWORD for p in params):
        return sorted(available - set(fixed))
    missing = [p.name for p in params if p.default is p.empty and p.kind != p.VAR_POSITIONAL
               and p.name not in available and p.name not in fixed]
    if missing:
        have = ", ".join(sorted(available)) or "none: only a prompts-format file (a prompt field and others) has them"
        raise UserError(f"reward function {spec} needs {missing} for each prompt, which the prompt records do not "
                        f"have (their other fields: {have}); add the field to data.train, map it with "
                        "data.fields, or give a value in reward.functions[].kwargs")
    return [n for n in names if n in available and n not in fixed]


def score_responses(reward_fn, batch: RolloutBatch, micro_batch_size: int = 8) -> torch.Tensor:
    """[B] fp32 scores: :func:`reward_model_scores` when ``reward_fn`` is a model (an
    ``nn.Module``), else :func:`function_scores`."""
    if isinstance(reward_fn, nn.Module):
        return reward_model_scores(reward_fn, batch, micro_batch_size)
    if not callable(reward_fn):
        raise UserError(f"the reward must be a reward model or a callable, got {type(reward_fn)}")
    return function_scores(reward_fn, batch)


def load_reward_function(spec: str) -> Callable:
    """The callable named by ``"module:function"`` (``"pkg.mod:obj.attr"`` and
    ``"path/to/file.py:function"`` work too), imported with the current working directory on
    ``sys.path``. Any failure is a UserError that says what went wrong."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise UserError(f"reward function {spec!r}: expected 'module:function'")
    module_name, attr = (s.strip() for s in spec.split(":"))
    if not module_name or not attr:
        raise UserError(f"reward function {spec!r}: expected 'module:function'")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UserError(f"reward function {spec!r}: no file {path.resolve()}")
            mod_spec = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(mod_spec)
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except UserError:
        raise
    except ModuleNotFoundError as e:
        raise UserError(
            f"reward function {spec!r}: cannot import module {module_name!r} ({e}); it is looked "
            f"up on sys.path, which starts with the working directory {cwd}"
        ) from None
    except Exception as e:
        raise UserError(
            f"reward function {spec!r}: importing {module_name!r} failed: {type(e).__name__}: {e}"
        ) from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"reward function {spec!r}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise UserError(
            f"reward function {spec!r}: {attr!r} is a {type(obj).__name__}, not a callable"
        )
    return obj

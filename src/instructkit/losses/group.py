"""Critic-free RL as pure functions over tensors: GRPO, Dr. GRPO, RLOO and REINFORCE++.

Instead of a value model, each prompt is answered ``G`` times and the group is the baseline.

Layout: ``B = N * G`` responses, prompt-major (the G answers to prompt ``i`` are rows
``i*G .. i*G + G - 1``); ``T`` response tokens; every ``mask`` is ``[B, T]`` over the response
tokens (a prefix mask, as in :mod:`instructkit.losses.rl`). Scores are one number per response
([B]); an advantage is per response ([B], the same for each of its tokens) or per token
([B, T], REINFORCE++).

The loss is a per-token clipped ratio (:func:`clipped_token_loss`) reduced by one of three
aggregations (:func:`aggregate`), each returned as ``(sum, count)`` so that the engine divides
by the count over every micro-batch and rank once (``engine.fit.accumulate_batches``):

- ``token_mean``: every real token of the mini-batch weighs the same (DAPO; TRL's default);
  long answers weigh more than short ones.
- ``seq_mean``: the mean over each answer's tokens, then over answers (the GRPO paper); a token
  of a short answer weighs more than one of a long answer, which favours long wrong answers.
- ``token_sum``: the sum over tokens divided by a constant (``max_new_tokens``) per answer
  (Dr. GRPO): no length bias either way.

KL to the reference (:func:`kl_k2` beside ``rl.kl_k1`` / ``rl.kl_k3``), as a loss term its
gradient through ``log pi`` (samples from pi, the estimator not differentiated through the
sampling) is: k1, zero in expectation (useless as a loss); k2 = 0.5 (log pi - log ref)^2, the
exact gradient of KL(pi || ref); k3 (GRPO's and TRL's choice), the gradient of the FORWARD
KL(ref || pi), which agrees with the reverse KL only to first order near the reference. As a
reward penalty k1 is the right one (see ``rl.kl_k3``).
"""

from __future__ import annotations

from typing import Literal

import torch

from instructkit.losses.rl import masked_whiten

Aggregation = Literal["token_mean", "seq_mean", "token_sum"]

__all__ = [
    "aggregate",
    "clipped_token_loss",
    "dr_grpo_advantages",
    "equal_groups",
    "grpo_advantages",
    "group_view",
    "kl_k2",
    "reinforce_pp_advantages",
    "rloo_advantages",
    "sequence_kl",
]


def group_view(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """scores [B] -> [N, G] (prompt-major); a ValueError when B is not a multiple of G."""
    if group_size < 1 or scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} scores do not split into groups of {group_size}")
    return scores.float().reshape(-1, group_size)


def grpo_advantages(scores: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO (Shao et al. 2024): ``(r - mean_g) / (std_g + eps)`` with the unbiased standard
    deviation of the group (as TRL). scores [B] -> advantages [B]; an all-equal group gives 0."""
    g = group_view(scores, group_size)
    std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
    return ((g - g.mean(dim=1, keepdim=True)) / (std + eps)).reshape(-1)


def dr_grpo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dr. GRPO (Liu et al. 2025): ``r - mean_g``, no division by the group's std (which gives
    groups that are nearly all right or all wrong the largest steps). [B] -> [B]."""
    g = group_view(scores, group_size)
    return (g - g.mean(dim=1, keepdim=True)).reshape(-1)


def rloo_advantages(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO (Ahmadian et al. 2024): each answer's score minus the mean of the OTHER G - 1 in
    its group, ``r_i - (sum_g - r_i) / (G - 1) = G / (G - 1) * (r_i - mean_g)``. [B] -> [B];
    needs G >= 2."""
    if group_size < 2:
        raise ValueError("RLOO needs at least 2 answers per prompt (grpo.group_size)")
    g = group_view(scores, group_size)
    others = (g.sum(dim=1, keepdim=True) - g) / (group_size - 1)
    return (g - others).reshape(-1)


def reinforce_pp_advantages(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor, gamma: float = 1.0,
    sum_over_ranks=None,
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025, OpenRLHF): per-token rewards ``-kl_coef * kl_t`` plus the score on
    the last real token, their reward-to-go ``sum_{k>=t} gamma^(k-t) r_k``, whitened over every
    real token of the batch (over all ranks with ``sum_over_ranks``): no group baseline, no
    value model. scores [B], kl [B, T] (k1 for a reward), mask [B, T] -> [B, T], 0 off the mask."""
    from instructkit.losses.rl import gae, per_token_rewards

    rewards = per_token_rewards(scores, kl, kl_coef, mask)
    _, returns = gae(rewards, torch.zeros_like(rewards), mask, gamma, lam=1.0)
    return masked_whiten(returns, mask, sum_over_ranks=sum_over_ranks)


def equal_groups(scores: torch.Tensor, group_size: int, tol: float = 1e-6) -> torch.Tensor:
    """[N] bool: groups whose scores are all equal (within ``tol``): their group advantages are
    0 and they carry no signal."""
    g = group_view(scores, group_size)
    return (g.max(dim=1).values - g.min(dim=1).values) <= tol


def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """``0.5 * (logp - ref_logp)^2`` per token [B, T]: as a loss its gradient through logp is
    the exact gradient of KL(pi || ref) under samples from pi."""
    return 0.5 * (logp.float() - ref_logp.float()) ** 2


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """k1 summed over each answer's tokens, [B]: the KL penalty of a sequence-level reward
    (``r - kl_coef * KL``, RLOO's and TRL's "KL in the reward")."""
    return ((logp.float() - ref_logp.float()) * mask.to(torch.float32)).sum(1)


def clipped_token_loss(
    logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
    clip: float = 0.2, clip_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped surrogate per token, ``max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip_high))``
    with ``ratio = exp(logp - old_logp)``; ``clip_high`` (DAPO's asymmetric clip, default
    ``clip``) lets rare tokens' probabilities rise further.

    logp [B, T] (with gradient), old_logp [B, T], advantages [B] or [B, T], mask [B, T].
    Returns ``(per_token [B, T] fp32, 0 off the mask; stats)``: ``clipfrac`` (share of real
    tokens where the clipped term is taken) and ``ratio_max``, detached. A ratio of 1 gives
    ``-A`` on every real token."""
    m = mask.to(torch.float32)
    adv = advantages.float().detach()
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    ratio = torch.exp(logp.float() - old_logp.float().detach())
    high = clip if clip_high is None else clip_high
    unclipped, clipped = -adv * ratio, -adv * ratio.clamp(1.0 - clip, 1.0 + high)
    per_token = torch.maximum(unclipped, clipped) * m
    with torch.no_grad():
        r = ratio.detach()
        stats = {"clipfrac": ((clipped > unclipped).float() * m).sum() / m.sum().clamp(min=1),
                 "ratio_max": torch.where(m > 0, r, torch.zeros_like(r)).max()}
    return per_token, stats


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: Aggregation,
              max_len: int | None = None) -> tuple[torch.Tensor, int]:
    """``(loss summed over this batch, what it is a sum over)`` for a per-token loss [B, T]:
    ``token_mean`` -> (sum of token losses, real tokens); ``seq_mean`` -> (sum over answers of
    their token mean, answers); ``token_sum`` -> (sum of token losses / max_len, answers). An
    answer whose mask is all 0 (kept out of the loss) is not counted. Dividing the sum by the
    count (over all micro-batches and ranks) gives the loss."""
    m = mask.to(torch.float32)
    x = per_token.float() * m
    answers = int((m.sum(1) > 0).sum())
    if mode == "token_mean":
        return x.sum(), int(m.sum())
    if mode == "seq_mean":
        return (x.sum(1) / m.sum(1).clamp(min=1)).sum(), answers
    if mode == "token_sum":
        if not max_len:
            raise ValueError("token_sum needs max_len (the constant each answer's sum is divided by)")
        return x.sum() / max_len, answers
    raise ValueError(f"unknown aggregation {mode!r}")

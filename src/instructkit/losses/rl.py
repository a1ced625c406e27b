"""PPO building blocks as pure functions over tensors: rewards, KL control, GAE, the clipped
losses and their statistics. No model inside (sampling and forward passes: ``rollout.py``).

Shapes: ``B`` sequences, ``T`` response tokens, ``V`` vocabulary. Every ``mask`` is ``[B, T]``
over the RESPONSE tokens: 1 from the first response token up to and including the first EOS,
0 after it (right padding; a prefix mask). Masks may be bool, int or float.

Conventions:

- KL penalty: the per-token reward is ``-kl_coef * kl_t`` with ``kl_t`` an estimate of
  ``log pi(y_t) - log pi_ref(y_t)`` (:data:`KL_ESTIMATORS`): drifting from the reference
  costs reward.
- The sequence score (reward model or function) is added on the LAST real response token
  (index ``mask.sum(1) - 1``: the EOS when the response reached one), see
  :func:`per_token_rewards`.
- Aggregation: losses and statistics are token-level masked means over the whole batch
  (every real response token weighs the same, so long responses count more than short ones;
  the choice of InstructGPT-era PPO implementations). A caller that accumulates micro-batches
  weighs each micro-batch's mean by its token count, or accepts the small bias.
- Tensors are computed in fp32. Statistics are returned as detached 0-dim tensors (reading
  them costs a device sync only when the caller logs), except :func:`explained_variance`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from instructkit.losses.sft import masked_mean

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "RunningMoments",
    "clip_scores",
    "entropy_bonus",
    "entropy_from_logits",
    "explained_variance",
    "gae",
    "kl_k1",
    "kl_k3",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "mix_ptx_loss",
    "normalize_scores",
    "penalize_no_eos",
    "per_token_rewards",
    "policy_loss_clipped",
    "rollout_metrics",
    "value_loss_clipped",
]


# --------------------------------------------------------------------------- masked statistics
# masked_mean is instructkit.losses.sft.masked_mean (re-exported): mean where mask is true, over
# ``dim`` or everything; an all-zero mask gives 0, not NaN.


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = False) -> torch.Tensor:
    """Variance of ``values`` where ``mask`` is true, over all entries (0-dim tensor).

    values, mask: [B, T]. Population variance by default (divide by n); ``unbiased=True``
    divides by n - 1 (0 when n < 2). An all-zero mask gives 0.
    """
    values = values.float()
    m = mask.to(values.dtype)
    mean = masked_mean(values, m)
    var = masked_mean((values - mean) ** 2, m)
    if unbiased:
        n = m.sum()
        var = torch.where(n > 1, var * n / (n - 1).clamp(min=1), torch.zeros_like(var))
    return var


def masked_whiten(
    values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """``(values - mean) / sqrt(var + eps)`` with the mean and the (population) variance taken
    over the masked entries only, so padding does not shift them.

    values, mask: [B, T]. Returns [B, T] fp32: mean 0 and std 1 over the masked entries;
    masked-out entries are 0. ``shift_mean=False`` adds the mean back (scale only: the
    values keep their mean, e.g. rewards whose sign matters).

    ``sum_over_ranks``: a function returning the sum of a tensor over all ranks; then the
    mean and variance are those of every rank's entries together (global whitening), taken
    in two passes (sums, then squared deviations from the global mean).
    """
    values = values.float()
    m = mask.to(values.dtype)
    if sum_over_ranks is None:
        mean = masked_mean(values, m)
        var = masked_var(values, m)
    else:
        total, count = sum_over_ranks(torch.stack([(values * m).sum(), m.sum()]))
        count = count.clamp(min=1.0)
        mean = total / count
        var = sum_over_ranks(((values - mean) ** 2 * m).sum()) / count
    out = (values - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


# --------------------------------------------------------------------------- KL estimators


def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k1 estimator of KL(pi || ref) per token: ``logp - ref_logp``.

    logp, ref_logp: [B, T] log-probs of the sampled tokens under the policy and the reference.
    Returns [B, T] fp32. An unbiased estimate of the KL's value, high variance, negative for
    single tokens. As a per-token reward penalty (PPO's use) the policy-gradient estimator then
    follows the exact gradient of the KL term.
    """
    return logp.float() - ref_logp.float()


def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref) per token: ``(r - 1) - log r`` with
    ``r = ref / pi = exp(ref_logp - logp)``.

    logp, ref_logp: [B, T]. Returns [B, T] fp32. Always >= 0 and lower variance than k1; its
    VALUE is an unbiased estimate of the KL under samples from pi, but its GRADIENT is not: as
    a reward penalty, E_pi[grad log pi * k3] = grad KL(pi || ref) - grad KL(ref || pi), and the
    two nearly cancel while pi is close to ref, so it holds the policy to the reference much
    more weakly than k1 (see the note on ``ppo.kl_estimator`` in the README).
    """
    log_r = ref_logp.float() - logp.float()
    return torch.expm1(log_r) - log_r


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "k1": kl_k1,
    "k3": kl_k3,
}
"""Per-token KL estimators by name; ``"k1"`` is the default of the PPO stage."""


# --------------------------------------------------------------------------- KL coefficient


class FixedKLController:
    """A constant KL coefficient. ``update`` does nothing."""

    def __init__(self, coef: float):
        if not coef >= 0:
            raise ValueError(f"kl coefficient must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", section 2.2): after each PPO batch of ``n_steps`` samples with mean
    sequence KL ``current_kl``,

        error = clip(current_kl / target - 1, -0.2, 0.2)
        value *= 1 + error * n_steps / horizon

    so the coefficient grows when the KL is above ``target`` and shrinks when below; one
    update changes it by at most a factor ``1 +- 0.2 * n_steps / horizon``.
    """

    ERROR_CLIP = 0.2

    def __init__(self, init: float, target: float, horizon: int):
        if not init > 0:
            raise ValueError(f"initial kl coefficient must be > 0, got {init}")
        if not target > 0:
            raise ValueError(f"kl target must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"kl horizon must be > 0, got {horizon}")
        self.value = float(init)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        """Move the coefficient; returns the new value. ``current_kl``: a float or 0-dim
        tensor (the mean over sequences of the summed per-token KL)."""
        kl = float(current_kl)
        if not math.isfinite(kl):
            return self.value  # a non-finite KL says nothing about the direction
        error = min(max(kl / self.target - 1.0, -self.ERROR_CLIP), self.ERROR_CLIP)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])
        self.target = float(state.get("target", self.target))
        self.horizon = float(state.get("horizon", self.horizon))


# --------------------------------------------------------------------------- score statistics


class RunningMoments:
    """Running mean and (population) standard deviation of everything passed to
    :meth:`update`, merged batch by batch with Chan et al.'s parallel form of Welford's
    algorithm (exact in float64, no sum of squares that cancels).

    ``state_dict()`` is JSON-able (``count``, ``mean``, ``m2``: sum of squared deviations).
    """

    def __init__(self):
        self.count = 0
        self.mean = 0.0
        self.m2 = 0.0

    @property
    def var(self) -> float:
        return self.m2 / self.count if self.count else 0.0

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def update(self, values: torch.Tensor) -> tuple[float, float]:
        """Merge ``values`` (any shape; all entries count) and return that batch's own
        ``(mean, std)``."""
        x = values.detach().double().flatten()
        n = int(x.numel())
        if n == 0:
            return 0.0, 0.0
        b_mean = float(x.mean())
        b_m2 = float(((x - b_mean) ** 2).sum())
        total = self.count + n
        delta = b_mean - self.mean
        self.mean += delta * n / total
        self.m2 += b_m2 + delta * delta * self.count * n / total
        self.count = total
        return b_mean, math.sqrt(b_m2 / n)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count = int(state["count"])
        self.mean = float(state["mean"])
        self.m2 = float(state["m2"])


def normalize_scores(
    scores: torch.Tensor, mean: float | torch.Tensor, std: float | torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """``(scores - mean) / max(std, eps)``. scores: [B]; mean, std: the reward model's stored
    statistics (``load_reward_stats``) or a :class:`RunningMoments`'. Returns [B] fp32."""
    std = torch.as_tensor(std, dtype=torch.float32, device=scores.device).clamp(min=eps)
    return (scores.float() - mean) / std


def clip_scores(scores: torch.Tensor, limit: float | None) -> torch.Tensor:
    """Scores clamped to ``[-limit, limit]`` ([B] -> [B] fp32); ``limit=None``: unchanged."""
    if limit is None:
        return scores.float()
    if not limit > 0:
        raise ValueError(f"score clip limit must be > 0, got {limit}")
    return scores.float().clamp(-limit, limit)


def penalize_no_eos(
    scores: torch.Tensor, reached_eos: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Add ``penalty`` to the score of each response that never reached EOS (cut at
    ``max_new_tokens``); the others are unchanged.

    scores: [B], reached_eos: [B] bool, penalty: a number <= 0 (e.g. -1.0; it is ADDED, so a
    positive value, which would reward truncation, is refused). Returns [B] fp32.

    Adding rather than replacing keeps the reward model's ranking among truncated responses.
    Apply it after normalising and clipping so that the penalty is in normalised units and is
    never clipped away: ``penalize_no_eos(clip_scores(normalize_scores(s, m, sd), c), eos, p)``.
    """
    if not penalty <= 0:
        raise ValueError(f"the no-EOS penalty is added to the score: need <= 0, got {penalty}")
    missing = (~reached_eos.bool()).to(torch.float32)
    return scores.float() + penalty * missing


# --------------------------------------------------------------------------- rewards and GAE


def per_token_rewards(
    scores: torch.Tensor,
    kl: torch.Tensor,
    kl_coef: float | torch.Tensor,
    mask: torch.Tensor,
) -> torch.Tensor:
    """Per-token rewards of PPO-RLHF: ``-kl_coef * kl_t`` on every response token, plus the
    sequence score on the last real response token.

    scores: [B]; kl: [B, T] per-token KL estimate (:data:`KL_ESTIMATORS`); mask: [B, T]
    prefix mask. The score lands at index ``mask.sum(1) - 1`` (the first EOS when the response
    reached one, else the last sampled token). A row whose mask is all zero gets no score and
    zero rewards. Returns [B, T] fp32, 0 where the mask is 0.
    """
    m = mask.to(torch.float32)
    rewards = -kl_coef * kl.float() * m
    lengths = m.sum(1).long()  # [B]
    last = (lengths - 1).clamp(min=0)
    score = scores.float() * (lengths > 0).to(torch.float32)  # all-zero row: nothing to add
    return rewards.scatter_add(1, last.unsqueeze(1), score.unsqueeze(1))


@torch.no_grad()
def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016).

    rewards, values: [B, T] (values[t] = V of the state before response token t), mask:
    [B, T] prefix mask. The episode ends after the last real token: the value after it is 0
    (no bootstrap), and entries past it count as nothing:

        delta_t = r_t + gamma * V_{t+1} * m_{t+1} - V_t
        A_t     = (delta_t + gamma * lam * A_{t+1}) * m_t          (A_T = 0)
        R_t     = A_t + V_t                                          (the value target)

    Returns ``(advantages, returns)``, both [B, T] fp32, detached, 0 where the mask is 0.
    With gamma = lam = 1, A_t = sum_{k>=t} r_k - V_t (reward-to-go minus value).
    """
    m = mask.to(torch.float32)
    r = rewards.float() * m
    v = values.float() * m
    adv = torch.zeros_like(r)
    next_adv = torch.zeros_like(r[:, 0])
    next_value = torch.zeros_like(r[:, 0])
    for t in range(r.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]
        next_adv = (delta + gamma * lam * next_adv) * m[:, t]
        adv[:, t] = next_adv
        next_value = v[:, t]  # already 0 where m[:, t] is 0
    return adv, (adv + v) * m


# --------------------------------------------------------------------------- losses


def policy_loss_clipped(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate loss, token-level masked mean:

        ratio = exp(logp - old_logp)
        loss  = mean_masked(max(-A * ratio, -A * clip(ratio, 1 - clip, 1 + clip)))

    logp: [B, T] (with gradient), old_logp, advantages: [B, T] (detached), mask: [B, T].
    Returns ``(loss, stats)``: loss a 0-dim fp32 tensor; stats detached 0-dim tensors:
    ``clipfrac`` (share of tokens where the clipped term is the one taken, i.e. the gradient
    is cut), ``approx_kl`` (k3 estimate of KL(old || new) from the old samples:
    ``mean((ratio - 1) - log ratio)``, >= 0), ``ratio_mean``, ``ratio_max``.
    A ratio of 1 everywhere clips nothing and gives ``-mean_masked(A)``.
    """
    m = mask.to(torch.float32)
    adv = advantages.float().detach()
    log_ratio = logp.float() - old_logp.float().detach()
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        lr = log_ratio.detach()
        r = ratio.detach()
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), m),
            "approx_kl": masked_mean(torch.expm1(lr) - lr, m),
            "ratio_mean": masked_mean(r, m),
            "ratio_max": torch.where(m > 0, r, torch.zeros_like(r)).max(),
        }
    return loss, stats


def value_loss_clipped(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped value loss, token-level masked mean:

        v_clip = old + clip(values - old, -clip, +clip)
        loss   = 0.5 * mean_masked(max((values - R)^2, (v_clip - R)^2))

    values: [B, T] (with gradient), old_values, returns: [B, T] (detached), mask: [B, T].
    Returns ``(loss, stats)`` with ``vf_clipfrac`` (share of tokens where the clipped error is
    the larger one, so the gradient is cut) as a detached 0-dim tensor.
    """
    m = mask.to(torch.float32)
    values = values.float()
    old = old_values.float().detach()
    ret = returns.float().detach()
    v_clip = old + (values - old).clamp(-clip, clip)
    err = (values - ret) ** 2
    err_clip = (v_clip - ret) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clip), m)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clip > err).float(), m)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the softmax at each position: ``logsumexp(z) - sum softmax(z) * z``.

    logits: [B, T, V] (any float dtype; computed in fp32; divide by the sampling temperature
    first). Returns [B, T] fp32.
    """
    z = logits.float()
    p = torch.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, coef: float) -> torch.Tensor:
    """The entropy term to ADD to the loss: ``-coef * mean_masked(entropy)`` (0-dim).
    entropy, mask: [B, T]. ``coef = 0`` turns it off (the usual RLHF setting)."""
    return -coef * masked_mean(entropy.float(), mask.to(torch.float32))


def mix_ptx_loss(rl_loss: torch.Tensor, ptx_loss: torch.Tensor, coef: float) -> torch.Tensor:
    """InstructGPT's PPO-ptx objective as a loss: ``rl_loss + coef * ptx_loss`` with
    ``ptx_loss`` the mean next-token cross-entropy of a pretraining batch (e.g.
    ``sft_loss_sum`` divided by its token count) and ``coef`` the paper's gamma. 0-dim."""
    return rl_loss + coef * ptx_loss


# --------------------------------------------------------------------------- statistics


@torch.no_grad()
def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over the masked entries (a float).

    values, returns, mask: [B, T]. 1 when the values predict the returns perfectly, 0 when no
    better than their mean, negative when worse; NaN when the returns have no variance.
    """
    var_ret = float(masked_var(returns, mask))
    if var_ret == 0.0:
        return float("nan")
    return 1.0 - float(masked_var(returns.float() - values.float(), mask)) / var_ret


@torch.no_grad()
def rollout_metrics(
    kl: torch.Tensor,
    mask: torch.Tensor,
    reached_eos: torch.Tensor,
    scores: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Detached 0-dim statistics of a rollout batch.

    kl: [B, T] per-token KL estimate, mask: [B, T], reached_eos: [B] bool, scores: [B] (the
    final scores), entropy: [B, T]. Keys: ``kl`` (mean over sequences of the summed per-token
    KL: the quantity the adaptive controller targets), ``kl_per_token`` (masked mean),
    ``response_length`` (mean tokens, EOS included), ``no_eos_share`` (share of responses cut
    at max_new_tokens), ``score_mean``/``score_std`` (population), ``entropy`` (masked mean).
    """
    m = mask.to(torch.float32)
    out = {
        "kl": (kl.float() * m).sum(1).mean(),
        "kl_per_token": masked_mean(kl.float(), m),
        "response_length": m.sum(1).mean(),
        "no_eos_share": (~reached_eos.bool()).float().mean(),
    }
    if scores is not None:
        out["score_mean"] = scores.float().mean()
        out["score_std"] = scores.float().std(correction=0)
    if entropy is not None:
        out["entropy"] = masked_mean(entropy.float(), m)
    return out

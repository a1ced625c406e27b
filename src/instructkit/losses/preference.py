"""Preference losses as pure functions over tensors: reward model (pairwise, ranked lists) and
the DPO family. No model inside.

Shapes: ``R`` rows (sequences) of length ``L``; ``P`` pairs (better, worse); ``B`` preference
pairs in a DPO batch. Losses are returned per pair (``[P]`` / ``[B]``, fp32); the caller
reduces them (mean over the step's pairs) and applies coefficients.

Log-probabilities fed to the DPO family are *sequence* log-probabilities of the completion
under the policy and the reference model, built with :func:`sequence_logprobs` from
``instructkit.losses.sft.token_logprobs``: summed over the completion tokens for DPO, hinge and
conservative DPO, averaged per token for IPO (see :func:`ipo_loss`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# --------------------------------------------------------------------------- last real token


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token (``attention_mask != 0``) of each row.

    attention_mask: [R, L] (0/1, bool or int). Returns [R] long.

    Right padding, left padding and no padding all work, and so does pad == eos: the index
    comes from the mask, never from token ids, so an EOS that is a real token is the one
    scored. A row without any real token gets index 0 (no check: it would cost a device sync).
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [R, L], got shape {tuple(attention_mask.shape)}")
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    # Real positions keep their index, padding becomes -1; the largest is the last real token.
    marked = torch.where(attention_mask != 0, positions, -1)
    return marked.argmax(dim=-1).clamp(min=0)


def gather_last(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[r, index[r]]`` for each row.

    values: [R, L] or [R, L, ...] (e.g. hidden states [R, L, H]), index: [R] long.
    Returns [R] (or [R, ...]).
    """
    rows = torch.arange(values.shape[0], device=values.device)
    return values[rows, index.to(values.device)]


# --------------------------------------------------------------------------- reward model


def pairwise_reward_loss(
    r_better: torch.Tensor,
    r_worse: torch.Tensor,
    margin: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Bradley-Terry loss of a reward model, per pair: ``-log sigmoid(r_better - r_worse - m)``.

    r_better, r_worse: [P] scalar rewards of the preferred and the other response of each pair.
    margin: None, a float, or [P] (e.g. Llama-2's rating-gap margin): the better response must
    win by at least this much before the loss flattens out. Returns [P] fp32.
    """
    diff = r_better.float() - r_worse.float()
    if margin is not None:
        diff = diff - (margin.float() if torch.is_tensor(margin) else float(margin))
    return -F.logsigmoid(diff)


def reward_centering_term(
    r_better: torch.Tensor, r_worse: torch.Tensor | None = None
) -> torch.Tensor:
    """Auxiliary term that pulls rewards towards zero mean (scalar, fp32; the caller
    multiplies by its coefficient, e.g. 0.01, and adds it to the mean pairwise loss).

    With pairs (Eisenstein et al. 2023, "Helping or Herding?", Eq. 2; also what TRL's
    ``center_rewards_coefficient`` computes): ``mean((r_better + r_worse) ** 2)`` over the
    [P] pairs; the Bradley-Terry loss only sees reward differences, this fixes the offset.
    With one tensor of rewards [R] (``r_worse=None``): ``mean(r ** 2)``.
    """
    r = r_better.float() if r_worse is None else r_better.float() + r_worse.float()
    return (r**2).mean()


def reward_metrics(r_better: torch.Tensor, r_worse: torch.Tensor) -> dict[str, torch.Tensor]:
    """Detached scalar metrics of a batch of pairs (r_better, r_worse: [P]).

    ``accuracy`` (share of pairs with r_better > r_worse; ties count as wrong), ``margin``
    (mean r_better - r_worse), ``chosen_mean``/``chosen_std``, ``rejected_mean``/
    ``rejected_std`` (population std: 0, not NaN, for one pair). Values are 0-dim tensors,
    so that logging every step costs no device sync until the caller reads them.
    """
    b = r_better.detach().float()
    w = r_worse.detach().float()
    return {
        "accuracy": (b > w).float().mean(),
        "margin": (b - w).mean(),
        "chosen_mean": b.mean(),
        "chosen_std": b.std(correction=0),
        "rejected_mean": w.mean(),
        "rejected_std": w.std(correction=0),
    }


def ranked_pairs(
    group_sizes: Sequence[int], device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """All K(K-1)/2 (better, worse) pairs of each ranked group (InstructGPT).

    The rows of a batch hold the responses of each prompt together, group after group, each
    group ordered best first: group ``g`` has ``group_sizes[g]`` rows. Every response is
    scored once and enters all its pairs, so all pairs of a prompt share one forward pass.

    Returns ``(better [P], worse [P], group [P])`` long: row indices of the better and the worse
    response of each pair, and the group the pair belongs to; P = sum K(K-1)/2.
    """
    better: list[int] = []
    worse: list[int] = []
    group: list[int] = []
    start = 0
    for g, k in enumerate(group_sizes):
        if k < 2:
            raise ValueError(f"group {g} has {k} response(s); a ranked group needs at least 2")
        for i in range(k):
            for j in range(i + 1, k):
                better.append(start + i)
                worse.append(start + j)
                group.append(g)
        start += k
    return tuple(torch.tensor(x, dtype=torch.long, device=device) for x in (better, worse, group))


def ranked_reward_loss(
    rewards: torch.Tensor,
    group_sizes: Sequence[int],
    margin: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """InstructGPT's ranking loss, per group (prompt).

    rewards: [R] scores of the rows laid out as in :func:`ranked_pairs` (groups in order, best
    first). margin: None, a float or [P] (in :func:`ranked_pairs` order). Returns [G] fp32: the
    mean pairwise loss over each group's K(K-1)/2 pairs, the 1/C(K,2) weighting of the paper,
    so that a prompt with many responses does not outweigh the others. With K = 2 everywhere
    this equals :func:`pairwise_reward_loss` of the pairs.
    """
    better, worse, group = ranked_pairs(group_sizes, device=rewards.device)
    per_pair = pairwise_reward_loss(rewards[better], rewards[worse], margin)  # [P]
    n_groups = len(group_sizes)
    sums = per_pair.new_zeros(n_groups).index_add(0, group, per_pair)
    counts = torch.tensor(
        [k * (k - 1) / 2 for k in group_sizes], dtype=per_pair.dtype, device=per_pair.device
    )
    return sums / counts


# --------------------------------------------------------------------------- DPO family


def sequence_logprobs(
    token_logprobs: torch.Tensor, mask: torch.Tensor, average: bool = False
) -> torch.Tensor:
    """Log-probability of each sequence's completion.

    token_logprobs: [B, L] (``instructkit.losses.sft.token_logprobs``: 0 where there is no target),
    mask: [B, L] true on the completion tokens. Returns [B] fp32: the sum over the completion
    (DPO, hinge, conservative DPO), or with ``average=True`` the mean per completion token
    (IPO; a row with no completion token gives 0).
    """
    m = mask.to(torch.float32)
    total = (token_logprobs.float() * m).sum(-1)
    if not average:
        return total
    return total / m.sum(-1).clamp(min=1)


def _check_beta(beta: float) -> float:
    beta = float(beta)
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    return beta


def dpo_logits(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
) -> torch.Tensor:
    """The implicit reward gap before ``beta``: ``(pi_c - ref_c) - (pi_r - ref_r)``.

    All inputs [B]; returns [B] fp32.
    """
    chosen = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected = policy_rejected_logps.float() - ref_rejected_logps.float()
    return chosen - rejected


def dpo_sigmoid_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO (Rafailov et al. 2023): ``-log sigmoid(beta * logits)``, logits from
    :func:`dpo_logits`. Inputs [B] summed completion log-probs; returns [B] fp32.
    Equals log 2 for every pair when the policy equals the reference."""
    logits = dpo_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return -F.logsigmoid(_check_beta(beta) * logits)


def ipo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """IPO (Azar et al. 2023, Eq. 17 with tau = beta): ``(logits - 1 / (2 beta)) ** 2``.

    Pass log-probs AVERAGED per completion token (``sequence_logprobs(..., average=True)``)
    for the policy and the reference: with sums the squared target scales with the completion
    length. The averaged form is what the paper's results used and what TRL computes (it
    divides the summed log-ratios by the completion lengths). Inputs [B]; returns [B] fp32;
    ``(1 / (2 beta)) ** 2`` when the policy equals the reference.
    """
    beta = _check_beta(beta)
    logits = dpo_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return (logits - 1.0 / (2.0 * beta)) ** 2


def dpo_hinge_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """Hinge loss (SLiC / RSO): ``relu(1 - beta * logits)``. Inputs [B] summed completion
    log-probs; returns [B] fp32; 1 when the policy equals the reference."""
    logits = dpo_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return torch.relu(1.0 - _check_beta(beta) * logits)


def dpo_conservative_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    label_smoothing: float,
) -> torch.Tensor:
    """Conservative DPO (cDPO, Mitchell 2023): each label is assumed flipped with probability
    ``eps = label_smoothing``:
    ``-(1 - eps) log sigmoid(beta * logits) - eps log sigmoid(-beta * logits)``.

    ``label_smoothing`` in [0, 0.5); 0 gives :func:`dpo_sigmoid_loss`. Inputs [B] summed
    completion log-probs; returns [B] fp32.
    """
    eps = float(label_smoothing)
    if not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {eps}")
    z = _check_beta(beta) * dpo_logits(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps
    )
    return -(1.0 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def dpo_rewards(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards ``beta * (policy - reference)`` of the chosen and of the rejected
    responses: ([B], [B]) fp32, detached (for metrics)."""
    beta = _check_beta(beta)
    chosen = beta * (policy_chosen_logps.detach().float() - ref_chosen_logps.detach().float())
    rejected = beta * (policy_rejected_logps.detach().float() - ref_rejected_logps.detach().float())
    return chosen, rejected


def dpo_metrics(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Batch means as detached 0-dim fp32 tensors, named as TRL logs them:

    ``rewards/chosen``, ``rewards/rejected`` (:func:`dpo_rewards`), ``rewards/margins``
    (chosen - rejected), ``rewards/accuracies`` (share of pairs whose chosen reward is higher;
    ties count as wrong), ``logps/chosen``, ``logps/rejected`` (the policy's log-probs as
    given).
    """
    chosen, rejected = dpo_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "logps/chosen": policy_chosen_logps.detach().float().mean(),
        "logps/rejected": policy_rejected_logps.detach().float().mean(),
    }

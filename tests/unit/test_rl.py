"""PPO building blocks: values worked out by hand, identities, KL control, running moments."""

import json
import math

import numpy as np
import pytest
import torch

from instructkit.losses.rl import (
    KL_ESTIMATORS,
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clip_scores,
    entropy_bonus,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_k1,
    kl_k3,
    masked_mean,
    masked_var,
    masked_whiten,
    mix_ptx_loss,
    normalize_scores,
    penalize_no_eos,
    per_token_rewards,
    policy_loss_clipped,
    rollout_metrics,
    value_loss_clipped,
)

T = torch.tensor
LOG2 = math.log(2.0)


def close(a, b, tol=1e-6):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32),
        atol=tol, rtol=0,
    )


# --------------------------------------------------------------------------- masked statistics


def test_masked_mean_hand_computed():
    values = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = T([[1, 1, 0], [1, 0, 0]])
    # everything: (1 + 2 + 4) / 3; per row: (1 + 2) / 2 and 4 / 1
    assert close(masked_mean(values, mask), 7 / 3)
    assert close(masked_mean(values, mask, dim=1), [1.5, 4.0])
    # an all-zero mask gives 0, not NaN
    assert close(masked_mean(values, torch.zeros_like(mask)), 0.0)


def test_masked_var_hand_computed():
    values = T([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, 0.0, 0.0]])
    mask = T([[1, 1, 1, 0], [1, 1, 0, 0]])
    # masked entries 1..5: mean 3, squared deviations 4 1 0 1 4 = 10
    assert close(masked_var(values, mask), 10 / 5)
    assert close(masked_var(values, mask, unbiased=True), 10 / 4)
    assert close(masked_var(values, torch.zeros_like(mask), unbiased=True), 0.0)


def test_masked_whiten_uses_masked_entries_only():
    values = T([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 0.0]])
    mask = T([[1, 1, 1, 0], [1, 1, 0, 0]])
    out = masked_whiten(values, mask)
    # mean 3, population variance 2: (x - 3) / sqrt(2); padding (100, -50) ignored and zeroed
    s = math.sqrt(2.0)
    assert close(out, [[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]], tol=1e-5)
    m = mask.bool()
    assert close(out[m].mean(), 0.0, tol=1e-6)
    assert close(out[m].std(correction=0), 1.0, tol=1e-5)
    # scale only: the mean is added back
    kept = masked_whiten(values, mask, shift_mean=False)
    assert close(kept[m], (values[m] - 3) / s + 3, tol=1e-5)
    assert close(kept[~m], 0.0)


def test_masked_whiten_random_matches_numpy():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 7, generator=g) * 3 + 2
    mask = (torch.rand(4, 7, generator=g) > 0.4).long()
    out = masked_whiten(values, mask)
    x = values[mask.bool()].numpy()
    expected = (x - x.mean()) / np.sqrt(x.var() + 1e-8)
    assert np.allclose(out[mask.bool()].numpy(), expected, atol=1e-5)


# --------------------------------------------------------------------------- KL estimators


def test_kl_estimators_known_numbers():
    logp = torch.log(T([0.5, 0.25]))
    ref = torch.log(T([0.25, 0.5]))
    # k1 = logp - ref: log(0.5/0.25) = log 2, log(0.25/0.5) = -log 2
    assert close(kl_k1(logp, ref), [LOG2, -LOG2])
    # k3 = (r - 1) - log r with r = ref / p: r = 0.5 -> -0.5 + log 2 = 0.19315;
    # r = 2 -> 1 - log 2 = 0.30685
    assert close(kl_k3(logp, ref), [-0.5 + LOG2, 1 - LOG2])
    assert KL_ESTIMATORS["k1"] is kl_k1 and KL_ESTIMATORS["k3"] is kl_k3


def test_kl_k3_non_negative_and_zero_at_equal():
    g = torch.Generator().manual_seed(1)
    logp = -torch.rand(5, 9, generator=g) * 5
    ref = -torch.rand(5, 9, generator=g) * 5
    assert (kl_k3(logp, ref) >= 0).all()
    assert close(kl_k3(logp, logp), torch.zeros(5, 9))
    assert close(kl_k1(logp, logp), torch.zeros(5, 9))


# --------------------------------------------------------------------------- KL controllers


def test_fixed_kl_controller():
    c = FixedKLController(0.05)
    assert c.update(100.0, 512) == 0.05 and c.value == 0.05
    state = json.loads(json.dumps(c.state_dict()))
    d = FixedKLController(1.0)
    d.load_state_dict(state)
    assert d.value == 0.05
    with pytest.raises(ValueError):
        FixedKLController(-1.0)


def test_adaptive_kl_controller_moves_and_is_bounded():
    c = AdaptiveKLController(init=0.1, target=6.0, horizon=10000)
    # KL 12 = twice the target: error 1 clipped to 0.2; 0.1 * (1 + 0.2 * 256 / 10000)
    assert math.isclose(c.update(12.0, 256), 0.1 * 1.00512, rel_tol=1e-12)
    # far above the target: the same step (bounded)
    c2 = AdaptiveKLController(0.1, 6.0, 10000)
    assert math.isclose(c2.update(1e6, 256), 0.1 * 1.00512, rel_tol=1e-12)
    # KL 6.6: error 0.1 (unclipped): factor 1 + 0.1 * 0.0256
    c3 = AdaptiveKLController(0.1, 6.0, 10000)
    assert math.isclose(c3.update(6.6, 256), 0.1 * 1.00256, rel_tol=1e-12)
    # below the target: down, at most by 0.2 * n / horizon
    c4 = AdaptiveKLController(0.1, 6.0, 10000)
    assert math.isclose(c4.update(0.0, 256), 0.1 * (1 - 0.00512), rel_tol=1e-12)
    # at the target: unchanged; a non-finite KL: unchanged
    c5 = AdaptiveKLController(0.1, 6.0, 10000)
    assert c5.update(6.0, 256) == 0.1
    assert c5.update(float("nan"), 256) == 0.1
    # a 0-dim tensor works; the state round-trips through JSON
    c.update(torch.tensor(3.0), 256)
    state = json.loads(json.dumps(c.state_dict()))
    d = AdaptiveKLController(1.0, 1.0, 1)
    d.load_state_dict(state)
    assert d.value == c.value and d.target == 6.0 and d.horizon == 10000
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, 0.0, 10000)


# --------------------------------------------------------------------------- scores


def test_running_moments_match_numpy_over_merges():
    rng = np.random.default_rng(0)
    rm = RunningMoments()
    seen = []
    for n in (1, 5, 3, 17, 2):
        x = rng.normal(3.0, 2.0, size=n)
        seen.append(x)
        b_mean, b_std = rm.update(torch.tensor(x, dtype=torch.float32))
        x32 = x.astype(np.float32).astype(np.float64)
        assert math.isclose(b_mean, x32.mean(), abs_tol=1e-6)
        assert math.isclose(b_std, x32.std(), abs_tol=1e-6)
    allx = np.concatenate(seen).astype(np.float32).astype(np.float64)
    assert rm.count == allx.size
    assert math.isclose(rm.mean, allx.mean(), abs_tol=1e-9)
    assert math.isclose(rm.std, allx.std(), abs_tol=1e-9)
    state = json.loads(json.dumps(rm.state_dict()))
    other = RunningMoments()
    other.load_state_dict(state)
    assert other.mean == rm.mean and other.std == rm.std and other.count == rm.count


def test_normalize_clip_penalize():
    s = T([1.0, 3.0, 7.0])
    # (s - 3) / 2
    assert close(normalize_scores(s, 3.0, 2.0), [-1.0, 0.0, 2.0])
    # std 0 does not divide by zero
    assert torch.isfinite(normalize_scores(s, 3.0, 0.0)).all()
    assert close(clip_scores(T([-9.0, 0.5, 9.0]), 5.0), [-5.0, 0.5, 5.0])
    assert close(clip_scores(T([-9.0, 9.0]), None), [-9.0, 9.0])
    # the penalty is added to responses without EOS only
    out = penalize_no_eos(T([0.5, 0.5, -2.0]), T([True, False, False]), -1.0)
    assert close(out, [0.5, -0.5, -3.0])
    with pytest.raises(ValueError):
        penalize_no_eos(s, T([True, True, True]), 1.0)


# --------------------------------------------------------------------------- per-token rewards


def test_per_token_rewards_score_on_last_real_token():
    scores = T([1.0, 2.0, 3.0, 4.0])
    kl = torch.full((4, 4), 0.1)
    mask = T([[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]])
    out = per_token_rewards(scores, kl, 0.5, mask)
    # -0.5 * 0.1 = -0.05 on every real token; the score on index mask.sum - 1
    assert close(
        out,
        [
            [-0.05 + 1.0, 0.0, 0.0, 0.0],  # length 1: score on index 0
            [-0.05, -0.05, -0.05, -0.05 + 2.0],  # full length: on index 3
            [0.0, 0.0, 0.0, 0.0],  # no token: no score, no error
            [-0.05, -0.05 + 4.0, 0.0, 0.0],  # length 2: on index 1
        ],
        tol=1e-6,
    )
    # a tensor coefficient works too
    assert close(per_token_rewards(scores, kl, torch.tensor(0.5), mask), out)


# --------------------------------------------------------------------------- GAE


def test_gae_hand_computed():
    rewards = T([[0.0, 0.0, 1.0], [0.5, 1.0, 9.0]])
    values = T([[0.5, 0.4, 0.6], [0.2, 0.3, 7.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0 (gamma * lam = 0.72):
    #   t=2: delta = 1 + 0.9 * 0 - 0.6 = 0.4                 A2 = 0.4
    #   t=1: delta = 0 + 0.9 * 0.6 - 0.4 = 0.14              A1 = 0.14 + 0.72 * 0.4 = 0.428
    #   t=0: delta = 0 + 0.9 * 0.4 - 0.5 = -0.14             A0 = -0.14 + 0.72 * 0.428 = 0.16816
    # row 1 (the last token is t=1; reward 9 and value 7 at t=2 are padding):
    #   t=1: delta = 1 + 0.9 * 0 - 0.3 = 0.7                 A1 = 0.7
    #   t=0: delta = 0.5 + 0.9 * 0.3 - 0.2 = 0.57            A0 = 0.57 + 0.72 * 0.7 = 1.074
    assert close(adv, [[0.16816, 0.428, 0.4], [1.074, 0.7, 0.0]], tol=1e-6)
    # returns = A + V, 0 on padding
    assert close(ret, [[0.66816, 0.828, 1.0], [1.274, 1.0, 0.0]], tol=1e-6)


def test_gae_gamma_lambda_one_is_reward_to_go_minus_value():
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(3, 6, generator=g)
    values = torch.randn(3, 6, generator=g)
    mask = T([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    r = rewards * mask
    to_go = r.flip(1).cumsum(1).flip(1)  # sum_{k >= t} r_k over real tokens
    assert close(adv, (to_go - values) * mask, tol=1e-5)
    assert close(ret, to_go * mask, tol=1e-5)


def test_gae_defaults_and_no_gradient():
    rewards = T([[0.0, 1.0]], requires_grad=True)
    values = T([[0.0, 0.0]])
    adv, _ = gae(rewards, values, torch.ones(1, 2))
    # gamma 1, lam 0.95: A1 = 1, A0 = 0 + 1 * 0 - 0 + 0.95 * 1 = 0.95
    assert close(adv, [[0.95, 1.0]])
    assert not adv.requires_grad


# --------------------------------------------------------------------------- losses


def test_policy_loss_ratio_one_clips_nothing():
    adv = T([[1.0, -2.0, 3.0], [0.5, 7.0, 0.0]])
    mask = T([[1, 1, 1], [1, 0, 0]])
    logp = T([[-1.0, -2.0, -0.5], [-3.0, -1.0, -1.0]], requires_grad=True)
    loss, stats = policy_loss_clipped(logp, logp.detach().clone(), adv, mask, clip=0.2)
    # ratio 1: loss = -mean(A) over real tokens = -(1 - 2 + 3 + 0.5) / 4
    assert close(loss, -0.625)
    assert close(stats["clipfrac"], 0.0)
    assert close(stats["approx_kl"], 0.0)
    assert close(stats["ratio_mean"], 1.0)
    loss.backward()
    # d loss / d logp = -A * ratio / n_tokens
    assert close(logp.grad, [[-0.25, 0.5, -0.75], [-0.125, 0.0, 0.0]])


def test_policy_loss_clipped_cases():
    old = torch.zeros(1, 4)
    # ratios 1.5, 1.5, 0.5, 0.5 with advantages +2, -2, -1, +1 (clip 0.2)
    logp = torch.log(T([[1.5, 1.5, 0.5, 0.5]])).requires_grad_()
    adv = T([[2.0, -2.0, -1.0, 1.0]])
    loss, stats = policy_loss_clipped(logp, old, adv, torch.ones(1, 4), clip=0.2)
    # t0: max(-2 * 1.5, -2 * 1.2) = -2.4 (clipped)      t1: max(2 * 1.5, 2 * 1.2) = 3 (not)
    # t2: max(1 * 0.5, 1 * 0.8) = 0.8 (clipped)          t3: max(-0.5, -0.8) = -0.5 (not)
    assert close(loss, (-2.4 + 3.0 + 0.8 - 0.5) / 4)
    assert close(stats["clipfrac"], 0.5)
    loss.backward()
    # no gradient where clipped
    assert logp.grad[0, 0] == 0 and logp.grad[0, 2] == 0
    assert logp.grad[0, 1] != 0 and logp.grad[0, 3] != 0
    # approx KL (k3 of old vs new): (r - 1) - log r, averaged
    k = [(1.5 - 1) - math.log(1.5)] * 2 + [(0.5 - 1) - math.log(0.5)] * 2
    assert close(stats["approx_kl"], sum(k) / 4)
    assert close(stats["ratio_mean"], 1.0)


def test_policy_loss_ratio_above_with_positive_advantage_is_fully_clipped():
    logp = torch.full((2, 2), math.log(1.5))
    loss, stats = policy_loss_clipped(logp, torch.zeros(2, 2), torch.full((2, 2), 2.0),
                                      torch.ones(2, 2), clip=0.2)
    assert close(loss, -2.0 * 1.2)
    assert close(stats["clipfrac"], 1.0)


def test_value_loss_clipped_cases():
    old = T([[1.0, 1.0, 1.0, 5.0]])
    returns = T([[2.0, 2.0, 0.0, 5.0]])
    values = T([[1.5, 1.1, 0.5, 9.0]], requires_grad=True)
    mask = T([[1, 1, 1, 0]])
    loss, stats = value_loss_clipped(values, old, returns, mask, clip=0.2)
    # t0: v_clip = 1.2; (1.5 - 2)^2 = 0.25, (1.2 - 2)^2 = 0.64 -> 0.64 (clipped)
    # t1: inside the clip range: v_clip = 1.1; both 0.81 -> 0.81 (not clipped)
    # t2: v_clip = 0.8; (0.5 - 0)^2 = 0.25, (0.8 - 0)^2 = 0.64 -> 0.64 (clipped)
    # t3: padding. loss = 0.5 * (0.64 + 0.81 + 0.64) / 3
    assert close(loss, 0.5 * (0.64 + 0.81 + 0.64) / 3)
    assert close(stats["vf_clipfrac"], 2 / 3)
    loss.backward()
    assert values.grad[0, 0] == 0 and values.grad[0, 2] == 0 and values.grad[0, 3] == 0
    # t1: d/dv 0.5 * (v - 2)^2 / 3 = (1.1 - 2) / 3
    assert close(values.grad[0, 1], -0.9 / 3)


def test_value_loss_without_clipping_is_half_mse():
    values = T([[1.0, 2.0]])
    returns = T([[0.0, 0.0]])
    loss, stats = value_loss_clipped(values, values.clone(), returns, torch.ones(1, 2), clip=0.2)
    assert close(loss, 0.5 * (1 + 4) / 2)
    assert close(stats["vf_clipfrac"], 0.0)


def test_entropy_from_logits():
    logits = torch.zeros(1, 2, 8)
    logits[0, 1, 3] = 1e4  # all mass on one token
    ent = entropy_from_logits(logits)
    assert close(ent, [[math.log(8), 0.0]], tol=1e-5)
    # two equally likely tokens, the rest impossible: log 2
    two = torch.full((1, 1, 4), -1e9)
    two[0, 0, :2] = 0.0
    assert close(entropy_from_logits(two), [[LOG2]], tol=1e-6)
    # bonus: -coef * masked mean
    assert close(entropy_bonus(ent, T([[1, 0]]), 0.01), -0.01 * math.log(8), tol=1e-7)


def test_mix_ptx_loss():
    assert close(mix_ptx_loss(T(1.0), T(3.0), 0.5), 2.5)


def test_explained_variance():
    returns = T([[1.0, 2.0, 3.0, 50.0], [4.0, 0.0, 0.0, 0.0]])
    mask = T([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert math.isclose(explained_variance(returns, returns, mask), 1.0)
    # predicting the mean (2.5) explains nothing
    assert math.isclose(explained_variance(torch.full_like(returns, 2.5), returns, mask), 0.0,
                        abs_tol=1e-6)
    assert math.isnan(explained_variance(returns, torch.ones_like(returns), mask))


def test_rollout_metrics():
    kl = T([[0.1, 0.2, 0.3], [0.4, 9.0, 9.0]])
    mask = T([[1, 1, 1], [1, 0, 0]])
    m = rollout_metrics(kl, mask, T([False, True]), scores=T([1.0, 3.0]), entropy=kl)
    assert close(m["kl"], (0.6 + 0.4) / 2)  # mean of per-sequence sums
    assert close(m["kl_per_token"], 1.0 / 4)
    assert close(m["response_length"], 2.0)
    assert close(m["no_eos_share"], 0.5)
    assert close(m["score_mean"], 2.0) and close(m["score_std"], 1.0)
    assert close(m["entropy"], 0.25)

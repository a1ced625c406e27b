"""Critic-free RL maths (instructkit.losses.group), with values worked out by hand."""

import math

import pytest
import torch

from instructkit.losses import group as G
from instructkit.losses.rl import kl_k3

SCORES = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])  # two prompts, three answers each


def test_grpo_advantages_divide_by_the_groups_unbiased_std():
    # group 1: mean 2, unbiased std 1; group 2: all equal -> 0
    adv = G.grpo_advantages(SCORES, 3, eps=1e-4)
    assert torch.allclose(adv, torch.tensor([-1, 0, 1, 0, 0, 0]) / (1 + 1e-4))


def test_dr_grpo_only_subtracts_the_group_mean():
    assert torch.equal(G.dr_grpo_advantages(SCORES * 10, 3), torch.tensor([-10.0, 0, 10, 0, 0, 0]))


def test_rloo_is_the_leave_one_out_baseline():
    # 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5
    assert torch.allclose(G.rloo_advantages(SCORES, 3), torch.tensor([-1.5, 0, 1.5, 0, 0, 0]))
    with pytest.raises(ValueError, match="at least 2"):
        G.rloo_advantages(SCORES, 1)


def test_groups_must_divide_the_batch_and_equal_groups_are_found():
    assert G.equal_groups(SCORES, 3).tolist() == [False, True]
    with pytest.raises(ValueError, match="groups of 4"):
        G.grpo_advantages(SCORES, 4)


def test_reinforce_pp_whitens_the_kl_penalised_reward_to_go():
    scores = torch.tensor([1.0, 0.0])
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # rewards [-0.1, -0.2, -0.3 + 1] and [-0.5]; reward-to-go [0.4, 0.5, 0.7] and [-0.5]
    # mean 0.275, population variance 0.211875
    want = (torch.tensor([[0.4, 0.5, 0.7], [-0.5, 0, 0]]) - 0.275) / math.sqrt(0.211875 + 1e-8) * mask
    assert torch.allclose(G.reinforce_pp_advantages(scores, kl, 1.0, mask), want, atol=1e-6)


def test_clipped_token_loss_with_the_asymmetric_clip():
    logp = torch.log(torch.tensor([[1.5, 0.5], [0.5, 1.0]]))  # old log-probs 0: ratios as written
    old = torch.zeros(2, 2)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 2)
    loss, stats = G.clipped_token_loss(logp, old, adv, mask, clip=0.2)
    # A=+1: ratio 1.5 -> max(-1.5, -1.2) = -1.2 (clipped); ratio 0.5 -> max(-0.5, -0.8) = -0.5
    # A=-1: ratio 0.5 -> max(0.5, 0.8) = 0.8 (clipped); ratio 1 -> 1
    assert torch.allclose(loss, torch.tensor([[-1.2, -0.5], [0.8, 1.0]]))
    assert stats["clipfrac"] == pytest.approx(0.5) and stats["ratio_max"] == pytest.approx(1.5)
    loss, stats = G.clipped_token_loss(logp, old, adv, mask, clip=0.2, clip_high=0.5)
    assert loss[0, 0] == pytest.approx(-1.5) and stats["clipfrac"] == pytest.approx(0.25)


def test_the_three_aggregations():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    total, n = G.aggregate(per_token, mask, "token_mean")
    assert (float(total), n) == (10.0, 4)  # 2.5 per token
    total, n = G.aggregate(per_token, mask, "seq_mean")
    assert (float(total), n) == (6.0, 2)  # (2 + 4) / 2 answers
    total, n = G.aggregate(per_token, mask, "token_sum", max_len=4)
    assert (float(total), n) == (2.5, 2)  # 10 / 4 per answer, over 2 answers
    with pytest.raises(ValueError, match="max_len"):
        G.aggregate(per_token, mask, "token_sum")


def test_sequence_kl_and_k2_values():
    logp, ref = torch.tensor([[0.0, -1.0, -3.0]]), torch.tensor([[-1.0, -1.0, 0.0]])
    assert G.sequence_kl(logp, ref, torch.tensor([[1, 1, 0]])).tolist() == [1.0]
    assert torch.allclose(G.kl_k2(logp, ref), torch.tensor([[0.5, 0.0, 4.5]]))


def _expected_grad(estimator, logits, ref_logp):
    """E_{y ~ pi}[grad_theta estimator(log pi(y), log ref(y))], exact over a small vocabulary,
    the gradient through log pi only (as a loss term on sampled tokens)."""
    logits = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(logits, -1)
    weights = logp.exp().detach()  # the sampling distribution is not differentiated
    (weights * estimator(logp, ref_logp)).sum().backward()
    return logits.grad


def test_kl_estimators_as_losses_have_the_gradients_the_docstring_says():
    torch.manual_seed(0)
    logits, ref_logp = torch.randn(5), torch.log_softmax(torch.randn(5), -1)

    def grad_of(kl):
        x = logits.clone().requires_grad_(True)
        kl(torch.log_softmax(x, -1)).backward()
        return x.grad

    reverse = grad_of(lambda lp: (lp.exp() * (lp - ref_logp)).sum())  # KL(pi || ref)
    forward = grad_of(lambda lp: (ref_logp.exp() * (ref_logp - lp)).sum())  # KL(ref || pi)
    assert torch.allclose(_expected_grad(G.kl_k2, logits, ref_logp), reverse, atol=1e-6)
    assert torch.allclose(_expected_grad(kl_k3, logits, ref_logp), forward, atol=1e-6)
    assert not torch.allclose(reverse, forward, atol=1e-3)

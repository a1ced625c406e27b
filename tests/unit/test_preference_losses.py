"""Preference losses: values worked out by hand, identities, last-token indexing."""

import math

import pytest
import torch

from instructkit.losses.sft import token_logprobs
from instructkit.losses.preference import (
    dpo_conservative_loss,
    dpo_hinge_loss,
    dpo_logits,
    dpo_metrics,
    dpo_rewards,
    dpo_sigmoid_loss,
    gather_last,
    ipo_loss,
    last_token_index,
    pairwise_reward_loss,
    ranked_pairs,
    ranked_reward_loss,
    reward_centering_term,
    reward_metrics,
    sequence_logprobs,
)

EOS = 2  # with pad == eos in these tests
T = torch.tensor


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float32), T(b, dtype=torch.float32),
                          atol=tol, rtol=0)


# --------------------------------------------------------------------------- last token


def test_last_token_index_right_padding():
    mask = T([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 0]


def test_last_token_index_left_padding():
    mask = T([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(mask).tolist() == [4, 4, 4]


def test_last_token_index_no_padding_and_bool_mask():
    assert last_token_index(torch.ones(2, 3, dtype=torch.long)).tolist() == [2, 2]
    assert last_token_index(torch.ones(2, 3, dtype=torch.bool)).tolist() == [2, 2]


def test_last_token_index_pad_equals_eos():
    # Real tokens end with EOS; padding uses the same id. The real EOS (index 3) is the last
    # real token. A pad-id search ("rightmost token != pad") would pick index 2 instead.
    ids = T([[7, 8, 9, EOS, EOS, EOS], [EOS, EOS, 5, 6, EOS, EOS]])
    mask = T([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 0]])
    idx = last_token_index(mask)
    assert idx.tolist() == [3, 4]
    assert gather_last(ids, idx).tolist() == [EOS, EOS]
    pad_search = ((ids != EOS) * torch.arange(6)).argmax(-1)
    assert pad_search.tolist() == [2, 3]  # the wrong tokens: why the mask is used


def test_gather_last_on_values_and_hidden_states():
    values = T([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    assert gather_last(values, T([1, 2])).tolist() == [1.0, 5.0]
    hidden = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    out = gather_last(hidden, T([2, 0]))
    assert out.shape == (2, 4)
    assert torch.equal(out, torch.stack([hidden[0, 2], hidden[1, 0]]))


def test_last_token_index_rejects_4d_masks():
    with pytest.raises(ValueError):
        last_token_index(torch.ones(1, 1, 3, 3))


# --------------------------------------------------------------------------- reward model


def test_pairwise_reward_loss_by_hand():
    # differences 1, 0, -2:
    #   -log sigmoid(1)  = log(1 + e^-1) = 0.3132617
    #   -log sigmoid(0)  = log 2         = 0.6931472
    #   -log sigmoid(-2) = log(1 + e^2)  = 2.1269280
    rb, rw = T([2.0, 0.0, -1.0]), T([1.0, 0.0, 1.0])
    assert close(pairwise_reward_loss(rb, rw), [0.3132617, 0.6931472, 2.1269280])
    # margin 0.5: differences 0.5, -0.5, -2.5
    #   log(1 + e^-0.5) = 0.4740770, log(1 + e^0.5) = 0.9740770, log(1 + e^2.5) = 2.5788897
    assert close(pairwise_reward_loss(rb, rw, 0.5), [0.4740770, 0.9740770, 2.5788897])
    # per-pair margins [0.5, 0, 0]
    per_pair = pairwise_reward_loss(rb, rw, T([0.5, 0.0, 0.0]))
    assert close(per_pair, [0.4740770, 0.6931472, 2.1269280])


def test_pairwise_reward_loss_gradient_pushes_rewards_apart():
    rb = T([0.0], requires_grad=True)
    rw = T([0.0], requires_grad=True)
    pairwise_reward_loss(rb, rw).sum().backward()
    # d/d rb of log(1 + e^-(rb - rw)) at 0 is -sigmoid(0) = -0.5
    assert close(rb.grad, [-0.5]) and close(rw.grad, [0.5])


def test_reward_centering_term_by_hand():
    # pairs (Eisenstein et al. Eq. 2): sums 1 + -1 = 0 and 2 + 1 = 3 -> mean(0, 9) = 4.5
    assert close(reward_centering_term(T([1.0, 2.0]), T([-1.0, 1.0])), 4.5)
    # single tensor: mean(1, 4, 1, 1) = 1.75
    assert close(reward_centering_term(T([1.0, 2.0, -1.0, 1.0])), 1.75)


def test_reward_metrics_by_hand():
    m = reward_metrics(T([2.0, 0.0, -1.0]), T([1.0, 0.0, 1.0]))
    assert close(m["accuracy"], 1 / 3)  # the tie (0, 0) counts as wrong
    assert close(m["margin"], (1 + 0 - 2) / 3)
    assert close(m["chosen_mean"], 1 / 3)
    # deviations 5/3, -1/3, -4/3 -> sqrt((25 + 1 + 16) / 9 / 3) = sqrt(42 / 27)
    assert close(m["chosen_std"], math.sqrt(42 / 27))
    assert close(m["rejected_mean"], (1 + 0 + 1) / 3)
    one = reward_metrics(T([1.0]), T([0.0]))
    assert float(one["chosen_std"]) == 0.0  # not NaN for one pair


def test_ranked_pairs_enumerates_all_k_choose_2():
    better, worse, group = ranked_pairs([3, 2])
    # group 0 = rows 0, 1, 2 (best first): (0,1) (0,2) (1,2); group 1 = rows 3, 4: (3,4)
    assert better.tolist() == [0, 0, 1, 3]
    assert worse.tolist() == [1, 2, 2, 4]
    assert group.tolist() == [0, 0, 0, 1]
    b4, _, _ = ranked_pairs([4])
    assert len(b4) == 4 * 3 // 2
    with pytest.raises(ValueError):
        ranked_pairs([3, 1])


def test_ranked_reward_loss_by_hand():
    rewards = T([3.0, 1.0, 0.0, 0.5, 0.5])
    # group 0 differences 3-1=2, 3-0=3, 1-0=1:
    #   log(1+e^-2) = 0.1269280, log(1+e^-3) = 0.0485874, log(1+e^-1) = 0.3132617
    #   mean = 0.4887771 / 3 = 0.1629257
    # group 1: difference 0 -> log 2
    assert close(ranked_reward_loss(rewards, [3, 2]), [0.1629257, math.log(2)])


def test_ranked_loss_with_pairs_equals_pairwise_loss():
    torch.manual_seed(0)
    r = torch.randn(6)
    ranked = ranked_reward_loss(r, [2, 2, 2])
    assert torch.allclose(ranked, pairwise_reward_loss(r[0::2], r[1::2]))


# --------------------------------------------------------------------------- log-probs


def test_sequence_logprobs_sum_and_average():
    lp = T([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    mask = T([[0, 1, 1], [1, 1, 0]])
    assert close(sequence_logprobs(lp, mask), [-5.0, -1.0])
    assert close(sequence_logprobs(lp, mask, average=True), [-2.5, -0.5])
    assert close(sequence_logprobs(lp, torch.zeros_like(mask), average=True), [0.0, 0.0])


def test_sequence_logprobs_from_token_logprobs():
    # uniform logits over 4 tokens: each target has log-prob -log 4
    logits = torch.zeros(1, 3, 4)
    targets = T([[-100, 1, 2]])
    lp = token_logprobs(logits, targets)
    assert close(sequence_logprobs(lp, targets != -100), [-2 * math.log(4)])


# --------------------------------------------------------------------------- DPO by hand

# pair 1: policy chosen -10, rejected -12; reference -11, -11
#   logits = (-10 - -11) - (-12 - -11) = 1 - (-1) = 2
# pair 2: policy chosen -5, rejected -4; reference -5, -5
#   logits = 0 - 1 = -1
PC, PR, RC, RR = T([-10.0, -5.0]), T([-12.0, -4.0]), T([-11.0, -5.0]), T([-11.0, -5.0])
BETA = 0.1


def test_dpo_logits_by_hand():
    assert close(dpo_logits(PC, PR, RC, RR), [2.0, -1.0])


def test_dpo_sigmoid_loss_by_hand():
    # beta * logits = 0.2, -0.1
    # -log sigmoid(0.2)  = log(1 + e^-0.2) = log(1.8187308) = 0.5981389
    # -log sigmoid(-0.1) = log(1 + e^0.1)  = log(2.1051709) = 0.7443967
    assert close(dpo_sigmoid_loss(PC, PR, RC, RR, BETA), [0.5981389, 0.7443967])


def test_ipo_loss_by_hand():
    # 1 / (2 beta) = 5: (2 - 5)^2 = 9, (-1 - 5)^2 = 36
    assert close(ipo_loss(PC, PR, RC, RR, BETA), [9.0, 36.0], tol=1e-4)
    # beta = 0.5: 1 / (2 beta) = 1: (2 - 1)^2 = 1, (-1 - 1)^2 = 4
    assert close(ipo_loss(PC, PR, RC, RR, 0.5), [1.0, 4.0])


def test_dpo_hinge_loss_by_hand():
    # relu(1 - 0.2) = 0.8, relu(1 + 0.1) = 1.1
    assert close(dpo_hinge_loss(PC, PR, RC, RR, BETA), [0.8, 1.1])
    # beta = 1: relu(1 - 2) = 0, relu(1 + 1) = 2
    assert close(dpo_hinge_loss(PC, PR, RC, RR, 1.0), [0.0, 2.0])


def test_dpo_conservative_loss_by_hand():
    # eps = 0.1, z = 0.2: 0.9 * log(1 + e^-0.2) + 0.1 * log(1 + e^0.2)
    #   log(1 + e^0.2) = log(1 + e^-0.2) + 0.2 = 0.7981389
    #   = 0.9 * 0.5981389 + 0.1 * 0.7981389 = 0.5383250 + 0.0798139 = 0.6181389
    # z = -0.1: 0.9 * log(1 + e^0.1) + 0.1 * log(1 + e^-0.1)
    #   = 0.9 * 0.7443967 + 0.1 * 0.6443967 = 0.6699570 + 0.0644397 = 0.7343967
    assert close(dpo_conservative_loss(PC, PR, RC, RR, BETA, 0.1), [0.6181389, 0.7343967])


def test_dpo_rewards_and_metrics_by_hand():
    chosen, rejected = dpo_rewards(PC, PR, RC, RR, BETA)
    # chosen: 0.1 * (-10 + 11) = 0.1, 0.1 * (-5 + 5) = 0
    # rejected: 0.1 * (-12 + 11) = -0.1, 0.1 * (-4 + 5) = 0.1
    assert close(chosen, [0.1, 0.0]) and close(rejected, [-0.1, 0.1])
    m = dpo_metrics(PC, PR, RC, RR, BETA)
    assert close(m["rewards/chosen"], 0.05)
    assert close(m["rewards/rejected"], 0.0)
    assert close(m["rewards/margins"], (0.2 - 0.1) / 2)
    assert close(m["rewards/accuracies"], 0.5)
    assert close(m["logps/chosen"], -7.5)
    assert close(m["logps/rejected"], -8.0)


# --------------------------------------------------------------------------- identities


def random_logps(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(n, generator=g) * 50, -torch.rand(n, generator=g) * 50


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_policy_equal_to_reference(beta):
    chosen, rejected = random_logps()
    args = (chosen, rejected, chosen.clone(), rejected.clone(), beta)
    assert torch.allclose(dpo_sigmoid_loss(*args), torch.full((8,), math.log(2)))
    assert torch.allclose(ipo_loss(*args), torch.full((8,), (1 / (2 * beta)) ** 2))
    assert torch.allclose(dpo_hinge_loss(*args), torch.ones(8))
    for eps in (0.0, 0.2):  # both labels equally likely: log 2 whatever eps
        assert torch.allclose(dpo_conservative_loss(*args, eps), torch.full((8,), math.log(2)))
    m = dpo_metrics(*args)
    assert float(m["rewards/margins"]) == 0.0 and float(m["rewards/accuracies"]) == 0.0


def test_conservative_with_no_smoothing_is_sigmoid():
    pc, pr = random_logps(seed=1)
    rc, rr = random_logps(seed=2)
    assert torch.allclose(
        dpo_conservative_loss(pc, pr, rc, rr, 0.3, 0.0), dpo_sigmoid_loss(pc, pr, rc, rr, 0.3)
    )


def test_dpo_gradient_raises_chosen_lowers_rejected():
    pc = T([-3.0], requires_grad=True)
    pr = T([-3.0], requires_grad=True)
    dpo_sigmoid_loss(pc, pr, T([-3.0]), T([-3.0]), 0.5).sum().backward()
    # d/d pc of log(1 + e^-(beta z)) at z = 0: -beta * sigmoid(0) = -0.25
    assert close(pc.grad, [-0.25]) and close(pr.grad, [0.25])


def test_low_precision_inputs_give_fp32():
    pc, pr = (x.bfloat16() for x in random_logps())
    out = dpo_sigmoid_loss(pc, pr, pc, pr, 0.1)
    assert out.dtype == torch.float32
    assert pairwise_reward_loss(pc, pr).dtype == torch.float32


def test_invalid_beta_and_label_smoothing():
    with pytest.raises(ValueError):
        dpo_sigmoid_loss(PC, PR, RC, RR, 0.0)
    with pytest.raises(ValueError):
        ipo_loss(PC, PR, RC, RR, -1.0)
    with pytest.raises(ValueError):
        dpo_conservative_loss(PC, PR, RC, RR, 0.1, 0.5)

import math

import torch

from instructkit.losses.sft import chunked_cross_entropy_sum, masked_mean, sft_loss_sum, token_logprobs


def test_token_logprobs_by_hand():
    # Two-token vocabulary: logits [0, ln 3] -> p = [1/4, 3/4].
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    targets = torch.tensor([[1, -100]])
    lp = token_logprobs(logits, targets)
    assert torch.allclose(lp, torch.tensor([[math.log(0.75), 0.0]]))


def test_sft_loss_sum_counts_only_targets():
    logits = torch.zeros(1, 3, 4)  # uniform over 4 -> loss ln 4 per token
    targets = torch.tensor([[2, -100, 0]])
    loss, n = sft_loss_sum(logits, targets)
    assert n == 2
    assert math.isclose(float(loss), 2 * math.log(4.0), rel_tol=1e-6)


def test_masked_mean():
    v = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert float(masked_mean(v, m)) == (1 + 2 + 6) / 3
    assert torch.allclose(masked_mean(v, m, dim=1), torch.tensor([1.5, 6.0]))


def test_chunked_cross_entropy_matches_full_value_and_grads():
    torch.manual_seed(0)
    hidden = torch.randn(37, 8, requires_grad=True)
    weight = torch.randn(11, 8, requires_grad=True)
    targets = torch.randint(0, 11, (37,))
    full = torch.nn.functional.cross_entropy(hidden @ weight.t(), targets, reduction="sum")
    gh, gw = torch.autograd.grad(full, (hidden, weight))
    chunked = chunked_cross_entropy_sum(hidden, weight, targets, chunk_size=5)
    ch, cw = torch.autograd.grad(chunked, (hidden, weight))
    assert torch.allclose(full, chunked, atol=1e-5)
    assert torch.allclose(gh, ch, atol=1e-5) and torch.allclose(gw, cw, atol=1e-5)

import math

import pytest
import torch

from instructkit.config import TrainConfig
from instructkit.engine import checkpoint as C
from instructkit.engine.batches import BatchStream
from instructkit.engine.optim import build_optimizer, lr_multiplier
from instructkit.engine.runtime import get_rng_state, set_rng_state
from instructkit.engine.step import StepGuard, optimizer_step
from instructkit.errors import TrainingDiverged


def test_warmup_then_cosine_to_min_lr():
    t = TrainConfig(max_steps=10, lr=1.0, min_lr=0.1, warmup_steps=2)
    lrs = [lr_multiplier(s, 10, t) for s in range(10)]
    assert lrs[0] == 0.5 and lrs[1] == 1.0  # linear warmup reaches lr
    assert lrs[2] == 1.0  # cosine starts at the top
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert math.isclose(lr_multiplier(10, 10, t), 0.1)
    t2 = TrainConfig(max_steps=10, lr=1.0, warmup_fraction=0.5, schedule="constant")
    assert [lr_multiplier(s, 10, t2) for s in (0, 4, 5, 9)] == [0.2, 1.0, 1.0, 1.0]


def test_batch_stream_resumes_and_crosses_epochs():
    plan = lambda epoch: [(epoch, i) for i in range(3)]
    a = BatchStream(plan)
    first = a.take(4)
    b = BatchStream(plan)
    b.load_state_dict(a.state_dict())
    assert first == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert a.take(3) == b.take(3) == [(1, 1), (1, 2), (2, 0)]


def test_guard_skips_then_stops_with_diagnosis():
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = StepGuard(max_in_row=2, precision="bf16", attn="sdpa", lr=1e-3)
    before = model.weight.detach().clone()
    model(torch.ones(1, 2)).sum().backward()
    r = optimizer_step(model, opt, 1.0, guard, float("nan"), step=0)
    assert r.skipped and torch.equal(model.weight, before) and model.weight.grad is None
    model(torch.ones(1, 2)).sum().backward()
    r = optimizer_step(model, opt, 1.0, guard, 1.0, step=1)  # a good step resets the count
    assert not r.skipped and not torch.equal(model.weight, before)
    optimizer_step(model, opt, 1.0, guard, float("inf"), step=2)
    with pytest.raises(TrainingDiverged) as e:
        optimizer_step(model, opt, 1.0, guard, float("nan"), step=3)
    msg = str(e.value)
    assert "precision" in msg and "attention" in msg and "learning rate" in msg
    assert guard.total == 3


def test_guard_stops_on_exploded_or_nonfinite_weights_after_a_finite_step():
    """lr=1e30 makes step 1 finite yet puts |w| near 1e30: the run stops there, not later."""
    for lr, what in ((1e30, r"\|w\| up to 1e\+30"), (float("inf"), "non-finite")):
        model = torch.nn.Linear(2, 1)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        guard = StepGuard(max_in_row=100)
        model(torch.ones(1, 2)).sum().backward()
        with pytest.raises(TrainingDiverged, match=f"step 4: the update left the weights with {what}"):
            optimizer_step(model, opt, None, guard, 1.0, step=3)
    model = torch.nn.Linear(2, 1)  # an ordinary step passes
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(1, 2)).sum().backward()
    assert not optimizer_step(model, opt, None, StepGuard(max_in_row=1), 1.0, step=0).skipped


def test_guard_stops_a_collapsed_run_with_zero_gradient():
    from instructkit.engine.step import ZERO_GRADIENT_STEPS

    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = StepGuard(max_in_row=100)

    def zero_grad_step(step):
        (model(torch.ones(1, 2)) * 0).sum().backward()  # a gradient, all zeros
        return optimizer_step(model, opt, 1.0, guard, 6.93, step=step)

    for step in range(ZERO_GRADIENT_STEPS - 1):
        zero_grad_step(step)
    model(torch.ones(1, 2)).sum().backward()  # one real gradient resets the count
    optimizer_step(model, opt, 1.0, guard, 1.0, step=ZERO_GRADIENT_STEPS)
    for step in range(ZERO_GRADIENT_STEPS - 1):
        zero_grad_step(step)
    with pytest.raises(TrainingDiverged, match="exactly 0 for 5 steps in a row .loss 6.93.*collapsed"):
        zero_grad_step(99)


def test_checkpoint_round_trip_and_keep_last(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)  # frozen: not saved
    opt = build_optimizer(model, TrainConfig(max_steps=1, lr=0.01), torch.device("cpu"))
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    rng = get_rng_state()
    expected_rand = torch.rand(3)
    for step in (1, 2, 3):
        C.save_checkpoint(tmp_path, step, model, opt, {"stream": {"epoch": 0, "index": step}}, rng, keep_last=2)
    assert [p.name for p in C.list_checkpoints(tmp_path)] == ["step-000002", "step-000003"]
    # a half-written checkpoint (crash during save) is ignored
    (tmp_path / "step-000004.tmp").mkdir()
    assert C.latest_checkpoint(tmp_path).name == "step-000003"

    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    fresh[0].weight.requires_grad_(False)
    opt2 = build_optimizer(fresh, TrainConfig(max_steps=1, lr=0.01), torch.device("cpu"))
    state = C.load_checkpoint(C.latest_checkpoint(tmp_path), fresh, opt2)
    assert state["step"] == 3 and state["loop"]["stream"]["index"] == 3
    assert torch.equal(fresh[1].weight, model[1].weight)
    assert not torch.equal(fresh[0].weight, model[0].weight)  # frozen weights are not in it
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    set_rng_state(state["rng"])
    assert torch.equal(torch.rand(3), expected_rand)


def test_a_zero_loss_with_zero_gradient_is_not_a_collapse():
    """PPO on equal rewards with exact values: loss 0, gradient 0, nothing to learn; go on."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = StepGuard(max_in_row=1)
    for step in range(20):
        (model(torch.ones(1, 2)) * 0).sum().backward()
        optimizer_step(model, opt, 1.0, guard, 0.0, step=step)


def _sum_stage(model):
    """A stage whose micro-batch is (inputs [n, 3], targets [n]) and whose loss is the summed
    squared error: fit must turn any split of a step into the mean over the whole step."""
    from instructkit.engine.fit import Stage

    def loss(batch):
        x, y = batch
        err = (model(x).squeeze(-1) - y) ** 2  # [n]
        return err.sum(), float(err.detach().sum())

    return Stage(name="t", plan=lambda epoch: [], collate=lambda spec: spec, count=lambda b: len(b[1]),
                 loss=loss, evaluate=dict, tokens=lambda specs: 0)


def test_accumulate_gives_the_gradients_of_one_big_batch():
    """Micro-batches of 1, 2 and 5 items (uneven on purpose): the gradient is that of the mean
    over all 8 items, not the mean of three micro-batch means; the loss returned is that mean."""
    from instructkit.engine import distributed as D
    from instructkit.engine.fit import accumulate

    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8)
    model = torch.nn.Linear(3, 1)
    loss, parts = accumulate(D.Wrapped(model), _sum_stage(model), [(x[:1], y[:1]), (x[1:3], y[1:3]), (x[3:], y[3:])])
    split = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    whole = ((model(x).squeeze(-1) - y) ** 2).mean()
    whole.backward()
    for got, want in zip(split, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert loss == pytest.approx(float(whole), rel=1e-6)
    assert sum(parts) == pytest.approx(8 * float(whole), rel=1e-6)  # each micro-batch's part, in order
    # by hand: one item of squared error e has gradient 2 * e * x / 8 for the weight
    model.zero_grad()
    loss, _ = accumulate(D.Wrapped(model), _sum_stage(model), [(x[:1], y[:1])])
    e = float(model(x[:1]).squeeze() - y[0])
    torch.testing.assert_close(model.weight.grad[0], 2 * e * x[0], rtol=1e-5, atol=1e-6)


def test_schedule_multiplies_each_group_base_rate():
    """One schedule for every stage: a factor of each group's own base rate (PPO's value group
    at ppo.value_lr follows the policy's warmup and cosine, ending at the same min_lr ratio)."""
    from instructkit.engine.optim import lr_multiplier, set_lr

    t = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_steps=2, schedule="cosine", weight_decay=0.1)
    # by hand: warmup 1/2, 2/2; then cosine from 1 to 0.1 over 8 steps: midpoint 0.55; end 0.1
    assert [lr_multiplier(s, 10, t) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert lr_multiplier(6, 10, t) == pytest.approx(0.55)
    assert lr_multiplier(10, 10, t) == pytest.approx(0.1)
    policy, value = torch.nn.Linear(3, 3), torch.nn.Linear(3, 1)
    opt = build_optimizer({"policy": (policy.named_parameters(), 1e-3), "value": (value.named_parameters(), 5e-3)},
                          t, torch.device("cpu"))
    names = [(g["name"], g["base_lr"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    assert names == [("policy", 1e-3, 0.1, 1), ("policy.no_decay", 1e-3, 0.0, 1),
                     ("value", 5e-3, 0.1, 1), ("value.no_decay", 5e-3, 0.0, 1)]  # biases: no decay
    set_lr(opt, lr_multiplier(6, 10, t))
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5.5e-4, 5.5e-4, 2.75e-3, 2.75e-3])

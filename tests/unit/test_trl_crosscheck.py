"""Cross-check with a peer implementation: TRL (a dev dependency; skipped without it).

The same batch goes through TRL's trainers (``DPOTrainer.compute_loss``,
``RewardTrainer.compute_loss``, TRL's own collators and forward passes) and through ours
(``instructkit.losses.sft.token_logprobs`` + ``preference_losses``; ``reward_scores``), on twin
models built from the same seeds, all in fp32 (TRL's configs default to bf16 autocast,
switched off here). The losses must agree to 1e-4.
"""

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from instructkit.losses.sft import IGNORE_INDEX, token_logprobs  # noqa: E402
from instructkit.models.heads import reward_scores  # noqa: E402
from instructkit.models.tiny import build_tiny_model, tiny_tokenizer  # noqa: E402
from instructkit.losses.preference import (  # noqa: E402
    dpo_conservative_loss,
    dpo_hinge_loss,
    dpo_metrics,
    dpo_sigmoid_loss,
    ipo_loss,
    pairwise_reward_loss,
    reward_centering_term,
    reward_metrics,
    sequence_logprobs,
)

TOL = 1e-4
POLICY_SEED, REF_SEED, RM_SEED = 1, 2, 3

PAIRS = [
    {"prompt": "The cat sat on", "chosen": " the mat.", "rejected": " a dog, loudly and"},
    {"prompt": "Two plus two is", "chosen": " four", "rejected": " five or six"},
    {"prompt": "Say hi:", "chosen": " hello there, friend", "rejected": " no"},
]


@pytest.fixture(autouse=True)
def _quiet(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    datasets.disable_progress_bars()


# --------------------------------------------------------------------------- DPO


def trl_dpo(tmp_path, **config):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
        per_device_train_batch_size=len(PAIRS), **config,
    )
    trainer = DPOTrainer(
        model=build_tiny_model("tiny-llama", seed=POLICY_SEED),
        ref_model=build_tiny_model("tiny-llama", seed=REF_SEED),
        args=args,
        train_dataset=datasets.Dataset.from_list(PAIRS),
        processing_class=tiny_tokenizer(),
    )
    trainer.model.eval()
    return trainer


def trl_batch(trainer, rows):
    return trainer.data_collator([trainer.train_dataset[i] for i in rows])


def trl_loss(trainer, batch):
    with torch.no_grad():
        return float(trainer.compute_loss(trainer.model, dict(batch)))


@pytest.fixture(scope="module")
def twins():
    policy = build_tiny_model("tiny-llama", seed=POLICY_SEED).eval()
    ref = build_tiny_model("tiny-llama", seed=REF_SEED).eval()
    return policy, ref


def our_logps(model, batch, average=False):
    """(chosen [B], rejected [B]) completion log-probs of a TRL DPO batch, computed our way."""
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    # targets already shifted: position i predicts token i + 1 where that is a completion token
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[:, :-1] = ids[:, 1:].masked_fill(completion[:, 1:] == 0, IGNORE_INDEX)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    lp = sequence_logprobs(token_logprobs(logits, targets), targets != IGNORE_INDEX, average)
    return lp.chunk(2)  # the batch is [chosen..., rejected...]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_loss_and_metrics_match_trl(tmp_path, twins, beta):
    trainer = trl_dpo(tmp_path, beta=beta, loss_type=["sigmoid"])
    batch = trl_batch(trainer, range(len(PAIRS)))
    theirs = trl_loss(trainer, batch)
    policy, ref = twins
    pc, pr = our_logps(policy, batch)
    rc, rr = our_logps(ref, batch)
    ours = dpo_sigmoid_loss(pc, pr, rc, rr, beta).mean()
    assert abs(float(ours) - theirs) < TOL, (float(ours), theirs)
    assert abs(float(ours) - 0.6931) > 1e-3  # policy != reference: not a trivial log 2
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    for key, value in dpo_metrics(pc, pr, rc, rr, beta).items():
        assert abs(float(value) - logged[key]) < TOL * max(1.0, abs(logged[key])), key


def test_ipo_loss_matches_trl(tmp_path, twins):
    beta = 0.5
    trainer = trl_dpo(tmp_path, beta=beta, loss_type=["ipo"])
    batch = trl_batch(trainer, range(len(PAIRS)))
    theirs = trl_loss(trainer, batch)
    policy, ref = twins
    # IPO takes per-token averaged log-probs (TRL divides the summed log-ratios by the
    # completion lengths)
    pc, pr = our_logps(policy, batch, average=True)
    rc, rr = our_logps(ref, batch, average=True)
    ours = float(ipo_loss(pc, pr, rc, rr, beta).mean())
    assert abs(ours - theirs) < TOL * max(1.0, abs(theirs)), (ours, theirs)


def test_hinge_loss_matches_trl(tmp_path, twins):
    beta = 0.05  # small enough that some pairs sit inside the hinge
    trainer = trl_dpo(tmp_path, beta=beta, loss_type=["hinge"])
    batch = trl_batch(trainer, range(len(PAIRS)))
    theirs = trl_loss(trainer, batch)
    policy, ref = twins
    pc, pr = our_logps(policy, batch)
    rc, rr = our_logps(ref, batch)
    per_pair = dpo_hinge_loss(pc, pr, rc, rr, beta)
    assert (per_pair > 0).any()
    assert abs(float(per_pair.mean()) - theirs) < TOL, (float(per_pair.mean()), theirs)


def test_conservative_loss_matches_trl_on_single_pairs(tmp_path, twins):
    # TRL 1.x has no separate cDPO loss type: its label-smoothed form lives in "aot", which
    # sorts the policy and reference log-ratios over the batch before pairing them. With one
    # pair per batch the sort is the identity and "aot" is exactly conservative DPO.
    beta, eps = 0.1, 0.2
    trainer = trl_dpo(tmp_path, beta=beta, loss_type=["aot"], label_smoothing=eps)
    policy, ref = twins
    for i in range(len(PAIRS)):
        batch = trl_batch(trainer, [i])
        theirs = trl_loss(trainer, batch)
        pc, pr = our_logps(policy, batch)
        rc, rr = our_logps(ref, batch)
        ours = float(dpo_conservative_loss(pc, pr, rc, rr, beta, eps).mean())
        assert abs(ours - theirs) < TOL, (i, ours, theirs)


# --------------------------------------------------------------------------- reward model


def rm_twin():
    model = build_tiny_model("tiny-llama", seed=RM_SEED, num_labels=1)
    with torch.no_grad():
        model.score.weight.mul_(50.0)  # rewards of a few units, not ~0.01
    return model.eval()


@pytest.mark.parametrize("margin,center", [(False, None), (True, 0.01), (False, 0.5)])
def test_reward_model_loss_matches_trl(tmp_path, margin, center):
    from trl import RewardConfig, RewardTrainer

    rows = [{"chosen": p["prompt"] + p["chosen"], "rejected": p["prompt"] + p["rejected"]}
            for p in PAIRS]
    if margin:
        for row, m in zip(rows, [0.5, -0.25, 1.0]):
            row["margin"] = m
    args = RewardConfig(
        output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
        per_device_train_batch_size=len(rows), center_rewards_coefficient=center,
    )
    trainer = RewardTrainer(
        model=rm_twin(), args=args, train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tiny_tokenizer(),
    )
    trainer.model.eval()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        theirs = float(trainer.compute_loss(trainer.model, dict(batch)))
        rewards = reward_scores(rm_twin(), batch["input_ids"], batch["attention_mask"])
    better, worse = rewards.chunk(2)  # the batch is [chosen..., rejected...]
    ours = pairwise_reward_loss(better, worse, batch.get("margin")).mean()
    if center is not None:
        ours = ours + center * reward_centering_term(better, worse)
    assert abs(float(ours) - theirs) < TOL, (float(ours), theirs)
    assert abs(float(ours) - 0.6931) > 1e-2  # rewards far enough apart to tell
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    mine = reward_metrics(better, worse)
    assert abs(float(mine["accuracy"]) - logged["accuracy"]) < TOL
    assert abs(float(mine["margin"]) - logged["margin"]) < TOL

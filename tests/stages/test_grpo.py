"""GRPO / RLOO / Dr. GRPO / REINFORCE++ end to end on tiny models (CPU)."""

import json
from pathlib import Path

import pytest
import torch

from instructkit.config import GRPOConfig, SFTConfig, load_config
from instructkit.stages import grpo, sft

REPO = Path(__file__).resolve().parents[2]
QUIET = ["log.tensorboard=false", "log.progress=false"]


def steps(run_dir):
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward_mean" in r]


def samples(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "samples.jsonl").read_text().splitlines()]


def mean(xs):
    return sum(xs) / len(xs)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The shipped tiny configs as a user runs them, from a folder with the repository's data/
    and configs/: SFT, then GRPO on its result."""
    import os

    root = tmp_path_factory.mktemp("shipped-grpo")
    for name in ("data", "configs"):
        (root / name).symlink_to(REPO / name)
    old = os.getcwd()
    os.chdir(root)
    try:
        sft.run(load_config(SFTConfig, "configs/tiny/sft_full.yaml", QUIET))
        cfg = load_config(GRPOConfig, "configs/tiny/grpo.yaml", QUIET)
        grpo.run(cfg)
    finally:
        os.chdir(old)
    return root, steps(root / cfg.output_dir), root / cfg.output_dir


def grpo_cfg(root, tmp_path, *overrides, name="g"):
    return load_config(GRPOConfig, root / "configs/tiny/grpo.yaml", [
        f"output_dir={tmp_path / name}", f"policy.name_or_path={root / 'runs/tiny-sft-full/final'}",
        f"data.train={REPO / 'data/selfinstruct_seed_tasks.jsonl'}", *QUIET, *overrides])


def test_the_shipped_tiny_grpo_config_learns(shipped):
    """Four answers per prompt as the baseline, no value model: the share of "the" rises from
    about 0.01 to about 0.15 in 30 steps (measured: 0.0 -> 0.19)."""
    _, rows, out = shipped
    first, last = mean([r["reward_mean"] for r in rows[:5]]), mean([r["reward_mean"] for r in rows[-5:]])
    assert len(rows) == 30 and last > 3 * first and last > 0.08, [round(r["reward_mean"], 3) for r in rows]
    assert rows[0]["equal_group_share"] > rows[-1]["equal_group_share"]  # all-zero groups at the start
    for key in ("policy_loss", "grad_norm", "clipfrac", "entropy", "response_len", "reward_std",
                "reward_says_the_mean", "reward_says_the_std", "time_generate_share", "gen_tokens_per_s"):
        assert key in rows[-1], key
    assert 0 < rows[-1]["time_generate_share"] < 1
    # the only reward is says_the: the total is its score
    assert [r["reward_mean"] for r in rows] == [r["reward_says_the_mean"] for r in rows]
    rows_of_step = [s for s in samples(out) if s["step"] == 30]
    assert len(rows_of_step) == 8 and all(s["reward"] == s["reward_says_the"] for s in rows_of_step)
    assert all(s["prompt"] == rows_of_step[0]["prompt"] for s in rows_of_step[:4])  # one group: one prompt


def test_grpo_resumes_exactly_off_policy_with_kl(shipped, tmp_path, monkeypatch):
    """Killed during step 4 (after the step-2 checkpoint) and resumed: the same curve and samples
    as the uninterrupted run, in the two-epoch, KL-in-the-loss, dynamic-sampling path."""
    from instructkit.engine import run as R

    root, _, _ = shipped
    common = ["train.max_steps=5", "train.save_every=2", "grpo.epochs=2", "grpo.mini_batch_size=8",
              "grpo.kl_coef=0.1", "grpo.resample_rounds=1"]
    grpo.run(grpo_cfg(root, tmp_path, *common, name="full"))
    cut = grpo_cfg(root, tmp_path, *common, name="cut")
    real = R.optimizer_step

    def flaky(model, optimizer, max_grad_norm, guard, loss, step):
        if step == 3:
            raise KeyboardInterrupt
        return real(model, optimizer, max_grad_norm, guard, loss, step)

    monkeypatch.setattr(R, "optimizer_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        grpo.run(cut)
    monkeypatch.undo()
    grpo.run(cut, resume=True)
    a, b = steps(tmp_path / "full"), steps(tmp_path / "cut")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for key in ("reward_mean", "kl", "policy_loss", "clipfrac", "entropy", "equal_group_share"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], abs=1e-6), key
    assert max(r["clipfrac"] for r in a) > 0  # the second epoch is off-policy: the clip acts
    assert max(r["kl"] for r in a[1:]) > 0
    pick = lambda d: [(s["step"], s["response"]) for s in samples(d)]
    assert pick(tmp_path / "full") == pick(tmp_path / "cut")


def test_a_large_kl_coefficient_keeps_the_policy_at_the_reference(shipped, tmp_path):
    root, _, _ = shipped
    common = ["train.max_steps=12", "grpo.epochs=2", "grpo.mini_batch_size=8"]
    grpo.run(grpo_cfg(root, tmp_path, *common, "grpo.kl_coef=0.001", name="free"))
    grpo.run(grpo_cfg(root, tmp_path, *common, "grpo.kl_coef=20.0", name="held"))
    free, held = steps(tmp_path / "free"), steps(tmp_path / "held")
    kl_free, kl_held = mean([r["kl"] for r in free[-4:]]), mean([r["kl"] for r in held[-4:]])
    assert kl_held < 0.5 * kl_free, ([round(r["kl"], 4) for r in held], [round(r["kl"], 4) for r in free])


def test_the_report_draws_ppos_curves_and_the_groups_without_signal(shipped, tmp_path):
    from instructkit.report import find_stages, stage_panels, write_report

    root, _, _ = shipped
    cfg = grpo_cfg(root, tmp_path, "train.max_steps=2", "grpo.kl_coef=0.1")
    grpo.run(cfg)
    (stage,) = find_stages(Path(cfg.output_dir))
    titles = [title for title, _ in stage_panels(stage)]
    assert titles == ["learning rate", "reward", "KL", "response length", "RL losses", "groups without signal (GRPO)"]
    html, _ = write_report(Path(cfg.output_dir))
    assert "equal_group_share" in html.read_text() and "reward" in html.read_text()


@pytest.mark.parametrize("advantage,extra", [("rloo", []), ("dr_grpo", ["grpo.loss_aggregation=token_sum"]),
                                             ("reinforce_pp", ["grpo.kl_coef=0.05", "grpo.kl_mode=reward"])])
def test_each_advantage_estimator_raises_the_reward(shipped, tmp_path, advantage, extra):
    root, _, _ = shipped
    grpo.run(grpo_cfg(root, tmp_path, "train.max_steps=20", f"grpo.advantage={advantage}", *extra))
    rows = steps(tmp_path / "g")
    first, last = mean([r["reward_mean"] for r in rows[:4]]), mean([r["reward_mean"] for r in rows[-4:]])
    assert last > first + 0.02, [round(r["reward_mean"], 3) for r in rows]


def test_lora_holds_one_copy_of_the_base_and_full_without_kl_no_reference(shipped, tmp_path, monkeypatch):
    from instructkit import models as M

    root, _, _ = shipped
    loads = []
    real = M.load_model
    monkeypatch.setattr(M, "load_model", lambda model_cfg, *a, **k: loads.append(1) or real(model_cfg, *a, **k))
    lora = grpo.run(grpo_cfg(root, tmp_path, "train.max_steps=3", "adapter.kind=lora", "train.lr=5e-3",
                             "grpo.kl_coef=0.05", name="lora"))
    assert len(loads) == 1  # the reference is the base with the adapters off
    assert all(not p.requires_grad for n, p in lora.policy.named_parameters() if "lora_" not in n)
    assert steps(tmp_path / "lora")[-1]["kl"] > 0  # the adapters moved away from the base
    assert (lora.final_dir / "adapter_config.json").is_file()
    loads.clear()
    full = grpo.run(grpo_cfg(root, tmp_path, "train.max_steps=1", name="full"))
    assert len(loads) == 1 and "kl" not in steps(tmp_path / "full")[0]  # kl_coef 0: no reference copy
    assert (full.final_dir / "model.safetensors").is_file()


def test_weighted_reward_functions_with_a_record_field(shipped, tmp_path):
    """Two functions with weights, one reading each prompt's ``answer`` field: the total is the
    weighted sum per answer, and each function's mean is logged on its own."""
    root, _, _ = shipped
    data = tmp_path / "arith.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {a} plus {b}?", "answer": str(a + b)}) + "\n"
                            for a in range(1, 5) for b in range(1, 5)))
    cfg = grpo_cfg(root, tmp_path, f"data.train={data}", "train.max_steps=2", "reward.function=null",
                   "reward.functions=[{function: 'instructkit.rewards:gsm8k_match'}, "
                   "{function: 'instructkit.rewards:length_penalty', weight: 0.5, kwargs: {max_words: 4, soft_words: 2}}]")
    grpo.run(cfg)
    rows = steps(cfg.output_dir)
    assert {"reward_gsm8k_match_mean", "reward_length_penalty_mean"} <= set(rows[0])
    for s in samples(cfg.output_dir):
        n = len(s["response"].split())
        assert s["reward_length_penalty"] == -min(1.0, max(0.0, (n - 2) / 2))  # worked by hand
        assert s["reward"] == pytest.approx(s["reward_gsm8k_match"] + 0.5 * s["reward_length_penalty"])
    for r in rows:
        assert r["reward_mean"] == pytest.approx(r["reward_gsm8k_match_mean"] + 0.5 * r["reward_length_penalty_mean"])


def test_a_reward_model_and_a_function_combine_with_the_stored_normalisation(shipped, tmp_path):
    """model_weight x (score - train mean) / train std + weight x function, per answer; the
    model's raw score and the function's are logged apart."""
    from instructkit import models as M
    from instructkit.config import RMConfig
    from instructkit.stages import rm

    root, _, _ = shipped
    rm_cfg = load_config(RMConfig, REPO / "configs/tiny/rm.yaml", [
        f"output_dir={tmp_path / 'rm'}", f"model.name_or_path={root / 'runs/tiny-sft-full/final'}",
        f"data.train={REPO / 'data/hh_rlhf_harmless_sample.jsonl'}", "train.max_steps=2", *QUIET])
    reward_dir = rm.run(rm_cfg).final_dir
    mean_, std = M.load_reward_stats(str(reward_dir))
    cfg = grpo_cfg(root, tmp_path, f"reward.name_or_path={reward_dir}", "reward.model_weight=0.5",
                   "reward.function=null", "reward.functions=[{function: 'instructkit.rewards:says_the', weight: 2}]",
                   "train.max_steps=1")
    grpo.run(cfg)
    rows = steps(cfg.output_dir)
    assert {"reward_model_mean", "reward_says_the_mean"} <= set(rows[0])
    for s in samples(cfg.output_dir):
        expected = 0.5 * (s["reward_model"] - mean_) / std + 2 * s["reward_says_the"]
        assert s["reward"] == pytest.approx(expected, abs=1e-5)


def test_a_reward_function_that_needs_a_missing_field_is_one_line(shipped, tmp_path, capsys):
    from instructkit.cli import main

    root, _, _ = shipped
    code = main(["grpo", str(root / "configs/tiny/grpo.yaml"), f"output_dir={tmp_path / 'x'}",
                 f"policy.name_or_path={root / 'runs/tiny-sft-full/final'}", *QUIET,
                 "reward.function=instructkit.rewards:gsm8k_match"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "gsm8k_match needs ['answer'] for each prompt" in err and not (tmp_path / "x" / "metrics.jsonl").exists()


def test_dynamic_sampling_replaces_groups_without_signal(shipped, tmp_path):
    """At the start almost no answer says "the": every group scores all 0. With three extra
    rollouts per step the groups are replaced by groups with signal from new prompts."""
    root, plain, _ = shipped
    grpo.run(grpo_cfg(root, tmp_path, "train.max_steps=2", "grpo.resample_rounds=3"))
    rows = steps(tmp_path / "g")
    assert plain[0]["equal_group_share"] == 1.0
    assert rows[0]["resample_rounds"] >= 1 and rows[0]["equal_group_share"] < 1.0, rows[0]


def test_configs_that_cannot_work_are_rejected_with_the_reason():
    from instructkit.errors import ConfigError

    def load(*o):
        return load_config(GRPOConfig, REPO / "configs/tiny/grpo.yaml", list(o))

    with pytest.raises(ConfigError, match="needs at least 2"):
        load("grpo.group_size=1")
    load("grpo.group_size=1", "grpo.advantage=reinforce_pp", "grpo.mini_batch_size=4")
    with pytest.raises(ConfigError, match="gradient of k1 is zero in expectation"):
        load("grpo.kl_coef=0.1", "grpo.kl_estimator=k1")
    with pytest.raises(ConfigError, match="does nothing in the grpo stage"):
        load("grpo.gamma=0.9")
    with pytest.raises(ConfigError, match="does nothing in the grpo stage"):
        load("grpo.kl_estimator=k2")  # kl_coef is 0
    with pytest.raises(ConfigError, match="not both"):
        load("reward.functions=[{function: 'a:b'}]")
    with pytest.raises(ConfigError, match="strategy=ddp does not fit GRPO"):
        load("distributed.strategy=ddp")


def test_concatenated_batches_keep_each_rows_log_probs():
    """Dynamic sampling joins rollouts of different widths: each row's response log-probs under
    the model are what they were in its own batch."""
    from instructkit import models as M
    from instructkit import rollout as RO
    from instructkit.config import ModelConfig

    tok = M.load_tokenizer(ModelConfig())
    model = M.load_model(ModelConfig(), None, tok, torch.device("cpu")).eval()
    torch.manual_seed(0)
    a = RO.sample(model, tok, [[1, 5, 6], [1, 7]], max_new_tokens=3, seed=1)
    b = RO.sample(model, tok, [[1, 9, 10, 11, 12]], max_new_tokens=6, seed=2)
    joined = RO.concat_batches([a, b], tok.pad_token_id)
    assert joined.prompts == a.prompts + b.prompts and joined.responses == a.responses + b.responses
    lp = lambda batch: RO.response_logprobs(model, batch, 8)
    whole = lp(joined)
    torch.testing.assert_close(whole[:2, :a.response_len], lp(a), atol=1e-5, rtol=0)
    torch.testing.assert_close(whole[2:, :b.response_len], lp(b), atol=1e-5, rtol=0)
    assert float(whole[:2, a.response_len:].abs().sum()) == 0.0  # the new columns are off the mask

"""PPO end to end on tiny models (CPU)."""

import json
from pathlib import Path

import pytest
import torch

from instructkit.config import PPOConfig, RMConfig, SFTConfig, load_config
from instructkit.stages import ppo, rm, sft

REPO = Path(__file__).resolve().parents[2]


# configs/tiny/ppo.yaml starts from the SFT result of configs/tiny/sft_full.yaml; most tests
# here exercise the machinery on the random tiny model in the shared-base LoRA layout instead.
TINY_LORA = ["policy.name_or_path=tiny-llama", "adapter.kind=lora", "adapter.r=8", "adapter.alpha=16",
             "adapter.dropout=0.0", "train.lr=3e-3"]


def ppo_cfg(tmp_path, *overrides, name="ppo", lora=True):
    return load_config(PPOConfig, REPO / "configs/tiny/ppo.yaml", [
        f"output_dir={tmp_path / name}", f"data.train={REPO / 'data/selfinstruct_seed_tasks.jsonl'}",
        "log.tensorboard=false", "rollout.prompts_per_step=8", "rollout.micro_batch_size=8",
        "rollout.max_new_tokens=8", "ppo.mini_batch_size=4", "train.max_steps=4", "train.save_every=0",
        *(TINY_LORA if lora else []), *overrides])


def steps(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward_mean" in r]


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The two shipped tiny configs exactly as a user runs them, from a folder that has the
    repository's data/ and configs/: SFT, then PPO on its result."""
    import os

    root = tmp_path_factory.mktemp("shipped")
    for name in ("data", "configs"):
        (root / name).symlink_to(REPO / name)
    old = os.getcwd()
    os.chdir(root)
    try:
        sft.run(load_config(SFTConfig, "configs/tiny/sft_full.yaml", ["log.tensorboard=false"]))
        cfg = load_config(PPOConfig, "configs/tiny/ppo.yaml", ["log.tensorboard=false"])
        ppo.run(cfg)
    finally:
        os.chdir(old)
    return root, steps(root / cfg.output_dir), root / cfg.output_dir


def mean(xs):
    return sum(xs) / len(xs)


def test_the_shipped_tiny_ppo_config_learns(shipped):
    """A user's first PPO run visibly raises its reward (it went 0.888 -> 0.884 on the random
    LoRA model before): about 0.02 to 0.17 in 30 steps on two CPU cores."""
    _, rows, out = shipped
    first, last = mean([r["reward_mean"] for r in rows[:5]]), mean([r["reward_mean"] for r in rows[-5:]])
    assert len(rows) == 30 and last > 3 * first and last > 0.08, [round(r["reward_mean"], 3) for r in rows]
    assert max(r["kl"] for r in rows) < 10.0
    for key in ("policy_loss", "value_loss", "response_len", "clipfrac", "approx_kl", "entropy",
                "explained_variance", "no_eos_share", "time_generate", "time_train", "gen_tokens_per_s"):
        assert key in rows[-1]
    samples = [json.loads(l) for l in (Path(out) / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "response", "reward"} <= set(samples[0])


def says_and(prompts, responses):
    """A reward the shipped config was not tuned for: the share of words that are "and"."""
    import re

    words = [re.findall(r"[a-z']+", r.lower()) for r in responses]
    return [sum(x == "and" for x in w) / max(len(w), 1) for w in words]


def test_the_shipped_config_learns_a_reward_it_was_not_tuned_for(shipped, tmp_path, monkeypatch):
    root, _, _ = shipped
    monkeypatch.chdir(root)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    cfg = load_config(PPOConfig, "configs/tiny/ppo.yaml", [
        "log.tensorboard=false", f"output_dir={tmp_path / 'and'}", "reward.function=test_ppo:says_and"])
    ppo.run(cfg)
    rows = steps(cfg.output_dir)
    first, last = mean([r["reward_mean"] for r in rows[:5]]), mean([r["reward_mean"] for r in rows[-5:]])
    assert last > 3 * first and last > 0.05, [round(r["reward_mean"], 3) for r in rows]


def test_large_kl_coefficient_keeps_the_policy_at_the_reference(shipped, tmp_path, monkeypatch):
    root, free, _ = shipped
    monkeypatch.chdir(root)
    held = load_config(PPOConfig, "configs/tiny/ppo.yaml", [
        "log.tensorboard=false", f"output_dir={tmp_path / 'held'}", "ppo.kl_coef=50.0", "train.max_steps=20"])
    ppo.run(held)
    rows = steps(held.output_dir)
    kl_free, kl_held = mean([r["kl"] for r in free[14:20]]), mean([r["kl"] for r in rows[-6:]])
    reward_free, reward_held = mean([r["reward_mean"] for r in free[14:20]]), mean([r["reward_mean"] for r in rows[-6:]])
    assert kl_held < 0.25 * kl_free, ([round(r["kl"], 3) for r in rows], kl_free)
    assert reward_held < reward_free


def test_shared_base_layout_holds_one_copy_of_the_base(tmp_path, monkeypatch):
    from instructkit import models as M

    loads = []
    real = M.load_model

    def counting(model_cfg, *a, **k):
        loads.append(model_cfg.name_or_path)
        return real(model_cfg, *a, **k)

    monkeypatch.setattr(M, "load_model", counting)
    result = ppo.run(ppo_cfg(tmp_path, "train.max_steps=2"))
    actors = result.models
    assert loads == ["tiny-llama"]  # the policy only: no reference copy, no value model copy
    assert actors.shared and actors.ref_copy is None and actors.value_model is None
    with actors.reference() as ref:
        assert ref is actors.policy
    base = [n for n, _ in actors.policy.named_parameters() if "lora_" not in n]
    assert all(not p.requires_grad for n, p in actors.policy.named_parameters() if "lora_" not in n)
    assert len(base) == len(set(base))
    final = result.final_dir
    assert (final / "adapter_config.json").is_file() and (final / "value" / "value_head.safetensors").is_file()


def test_value_head_starts_from_the_reward_model(tmp_path):
    rm_cfg = load_config(RMConfig, REPO / "configs/tiny/rm.yaml", [
        f"output_dir={tmp_path / 'rm'}", f"data.train={REPO / 'data/hh_rlhf_harmless_sample.jsonl'}",
        "train.max_steps=2", "log.tensorboard=false"])
    reward_dir = rm.run(rm_cfg).final_dir
    cfg = ppo_cfg(tmp_path, f"reward.name_or_path={reward_dir}", "reward.function=null", "reward.normalize=stored",
                  "train.max_steps=1", "ppo.value_warmup_steps=1", f"data.train={REPO / 'data/hh_rlhf_harmless_sample.jsonl'}")
    from instructkit import models as M

    actors = ppo.Actors(cfg, M.load_tokenizer(cfg.policy), torch.device("cpu"))
    assert torch.equal(actors.value_head.weight, M.score_head(actors.reward_model).weight)
    result = ppo.run(cfg)
    row = steps(cfg.output_dir)[0]
    assert "score_mean" in row and "value_loss" in row  # scores normalised with the stored mean/std
    # value warm-up: the value adapter moved, the policy adapter did not
    params = dict(result.models.policy.named_parameters())
    assert all(float(p.abs().sum()) == 0 for n, p in params.items() if "lora_B.default" in n)
    assert result.steps == 1


def test_ppo_resumes_exactly(tmp_path, monkeypatch):
    from instructkit.engine import run as R

    common = ["train.max_steps=4", "train.save_every=2", "ppo.ptx_coef=0.1",
              f"ppo.ptx_data={REPO / 'data/selfinstruct_seed_tasks.jsonl'}"]
    ppo.run(ppo_cfg(tmp_path, *common, name="full"))
    cut = ppo_cfg(tmp_path, *common, name="cut")
    real = R.optimizer_step
    calls = {"n": 0}

    def flaky(model, optimizer, max_grad_norm, guard, loss, step):
        if step == 3:  # during step 4: step 3 was logged after the step-2 checkpoint
            raise KeyboardInterrupt
        return real(model, optimizer, max_grad_norm, guard, loss, step)

    monkeypatch.setattr(R, "optimizer_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        ppo.run(cut)
    monkeypatch.undo()
    ppo.run(cut, resume=True)
    a, b = steps(tmp_path / "full"), steps(tmp_path / "cut")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("reward_mean", "kl", "policy_loss", "value_loss", "ptx_loss"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], abs=1e-6), key
    # samples.jsonl too holds each step once (it had the steps after the checkpoint twice)
    samples = lambda d: [(r["step"], r["response"]) for r in map(json.loads, (d / "samples.jsonl").read_text().splitlines())]
    assert samples(tmp_path / "full") == samples(tmp_path / "cut")


def test_bad_reward_function_is_a_clear_error(tmp_path, capsys):
    from instructkit.cli import main

    code = main(["ppo", str(REPO / "configs/tiny/ppo.yaml"), f"output_dir={tmp_path / 'x'}", *TINY_LORA,
                 "reward.function=no_such_module:fn"])
    err = capsys.readouterr().err
    assert code == 2 and "no_such_module" in err and "Traceback" not in err


def test_shared_layout_keeps_frozen_layers_frozen_when_switching_adapters():
    import os

    from instructkit.config import PPOConfig, load_config
    from instructkit.models import load_tokenizer
    from instructkit.stages.ppo import Actors

    repo = Path(__file__).resolve().parents[2]
    old = os.getcwd()
    os.chdir(repo)
    try:
        cfg = load_config(PPOConfig, repo / "configs/tiny/ppo.yaml", [*TINY_LORA, "policy.freeze_layers=1", "policy.device=cpu"])
        actors = Actors(cfg, load_tokenizer(cfg.policy), torch.device("cpu"))
    finally:
        os.chdir(old)
    for name in ("value", "default"):
        actors.use(name)
        lora = {n: p.requires_grad for n, p in actors.policy.named_parameters() if "lora_" in n}
        assert any(".value." in n for n in lora) and any(".default." in n for n in lora)
        assert not any(v for n, v in lora.items() if ".layers.0." in n), name  # frozen by freeze_layers=1
        assert all(v for n, v in lora.items() if ".layers.1." in n), name  # both adapters trainable


def _update_grads(actors, cfg, exp, batch, monkeypatch):
    """Gradients of one PPO mini-batch update (no optimizer step), and how often decoder layer 0
    of the policy ran (twice per pass when checkpointing recomputes it in backward; counted at its
    first norm, since transformers' checkpointing calls the layer's forward, not its hooks)."""
    from instructkit import models as M

    grads, calls = {}, []

    class CapturingRun:  # a TrainingRun whose optimizer step only records the gradients
        optimizer = ppo.build_ppo_optimizer(actors, cfg, torch.device("cpu"))

        def optimizer_step(self, loss, max_grad_norm):
            for n, p in actors.trainable.named_parameters():
                if p.grad is not None:
                    grads[n] = p.grad.clone()
            self.optimizer.zero_grad(set_to_none=True)

    layer = M.decoder_layers(actors.policy)[0].input_layernorm
    hook = layer.register_forward_pre_hook(lambda *a: calls.append(1))
    torch.manual_seed(0)
    try:
        ppo.ppo_update(actors, CapturingRun(), exp, batch, cfg, None, policy_on=True)
    finally:
        hook.remove()
    return grads, len(calls)


@pytest.mark.parametrize("layout", ["shared", "separate"])
def test_gradient_checkpointing_works_in_ppo_updates(tmp_path, layout, monkeypatch):
    """policy.gradient_checkpointing recomputes the layers in backward (it did nothing while the
    update ran in eval mode) and gives the gradients of the plain update."""
    from instructkit import models as M
    from instructkit.data.prompts import load_prompts
    from instructkit.rewards import says_the

    over = (["policy.name_or_path=tiny-llama", "ppo.value_name_or_path=tiny-llama"] if layout == "separate"
            else [*TINY_LORA, "adapter.dropout=0.1"])  # dropout is switched off: checkpointing's recompute matches
    cfg = ppo_cfg(tmp_path, *over, "policy.gradient_checkpointing=true", "ppo.epochs=1", "ppo.mini_batch_size=8",
                  lora=False)
    tok = M.load_tokenizer(cfg.policy)
    torch.manual_seed(0)
    actors = ppo.Actors(cfg, tok, torch.device("cpu"))
    prompts = load_prompts(cfg.data, tok, cfg.rollout.max_prompt_len)[:8]
    exp, _, batch, _ = ppo.make_experience(actors, tok, prompts, cfg, 0.05, ppo.rl.RunningMoments(), (0.0, 1.0),
                                           says_the, ppo.rollout_stop_ids(cfg, tok, actors.policy))
    with_ckpt, n_ckpt = _update_grads(actors, cfg, exp, batch, monkeypatch)
    for m in (actors.policy, actors.value_model):
        if m is not None:
            m.gradient_checkpointing_disable()
    plain, n_plain = _update_grads(actors, cfg, exp, batch, monkeypatch)
    assert n_ckpt > n_plain > 0  # the layers ran again in backward
    assert with_ckpt.keys() == plain.keys() and len(plain) > 4
    assert any(".value." in n or n.startswith("value") for n in plain)  # the value model's gradients too
    for n in plain:
        torch.testing.assert_close(with_ckpt[n], plain[n], rtol=1e-4, atol=1e-6, msg=n)


def test_the_shipped_config_without_its_sft_run_says_what_to_run(tmp_path, monkeypatch, capsys):
    from instructkit.cli import main

    (tmp_path / "configs").symlink_to(REPO / "configs")
    monkeypatch.chdir(tmp_path)
    code = main(["ppo", "configs/tiny/ppo.yaml"])
    err = capsys.readouterr().err
    assert code == 2 and "instructkit sft configs/tiny/sft_full.yaml" in err and "Traceback" not in err


def test_exploded_weights_stop_ppo_before_they_are_sampled_or_saved(tmp_path, monkeypatch):
    """PPO at lr=1e30 never tripped the guard (finite losses), saved |w| = 4e28 and then died
    in sampling; now the step that blows the weights up stops the run with the diagnosis."""
    from instructkit.errors import TrainingDiverged

    real = ppo.build_ppo_optimizer

    def blowing_up(actors, cfg, device):
        opt = real(actors, cfg, device)
        step = opt.step

        def poisoned_step(*a, **k):
            step(*a, **k)
            with torch.no_grad():
                opt.param_groups[0]["params"][0].mul_(1e30)

        opt.step = poisoned_step
        return opt

    monkeypatch.setattr(ppo, "build_ppo_optimizer", blowing_up)
    cfg = ppo_cfg(tmp_path, "train.save_every=1", "train.max_nonfinite_steps=100")
    with pytest.raises(TrainingDiverged, match="step 1: the update left the weights with .w. up to"):
        ppo.run(cfg)
    assert not (Path(cfg.output_dir) / "checkpoints").exists() or not any((Path(cfg.output_dir) / "checkpoints").iterdir())
    assert not (Path(cfg.output_dir) / "final").exists()


@pytest.mark.parametrize("layout", ["shared", "separate"])
def test_final_and_its_value_model_appear_in_one_rename(tmp_path, layout, monkeypatch):
    """final/ must never exist without final/value/ (a crash between two renames left a final
    that looks complete and has no value model), and an older final is replaced whole."""
    import os

    from instructkit import models as M

    over = (["policy.name_or_path=tiny-llama", "ppo.value_name_or_path=tiny-llama"] if layout == "separate"
            else TINY_LORA)
    cfg = ppo_cfg(tmp_path, *over, lora=False)
    tok = M.load_tokenizer(cfg.policy)
    final = tmp_path / "final"
    final.mkdir()
    (final / "stale.txt").write_text("an older final")
    seen = []
    real_rename = os.rename

    def watching(src, dst, *a, **k):
        real_rename(src, dst, *a, **k)
        if final.is_dir() and not (final / "stale.txt").exists():
            seen.append((final / "value").is_dir() and (final / "config.json").is_file() or
                        (final / "adapter_config.json").is_file() and (final / "value").is_dir())

    monkeypatch.setattr(os, "rename", watching)
    ppo.save_ppo_final(ppo.Actors(cfg, tok, torch.device("cpu")), tok, cfg, final)
    assert seen and all(seen), seen
    assert not (final / "stale.txt").exists() and not list(tmp_path.glob("final.*"))
    value_file = "value_head.safetensors" if layout == "shared" else "config.json"
    assert (final / "value" / value_file).is_file()


def test_a_raising_reward_function_names_itself_the_prompt_and_the_checkpoint(tmp_path, capsys):
    """A reward function that raises was a traceback; now one line with the function, where it
    raised, the response it fails on, and the checkpoint the run can resume from, untouched."""
    from instructkit.cli import main

    (tmp_path / "flaky_reward.py").write_text(
        "calls = [0]\n"
        "def score(prompts, responses):\n"
        "    calls[0] += 1\n"
        "    if calls[0] > 2:\n"
        "        raise ValueError('cannot parse the answer')\n"
        "    return [0.0] * len(responses)\n")
    out = tmp_path / "x"
    code = main(["ppo", str(REPO / "configs/tiny/ppo.yaml"), f"output_dir={out}", *TINY_LORA,
                 f"reward.function={tmp_path / 'flaky_reward.py'}:score", "train.save_every=2", "train.max_steps=4",
                 "rollout.prompts_per_step=4", "rollout.micro_batch_size=4", "rollout.max_new_tokens=4",
                 "ppo.mini_batch_size=4", "log.tensorboard=false", "log.progress=false"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "step 3: reward function score raised ValueError: cannot parse the answer (at flaky_reward.py:5)" in err
    assert "on response 0 of the batch; prompt: '" in err
    ckpt = out / "checkpoints" / "step-000002"
    assert f"the last checkpoint, {ckpt}, is intact" in err and "--resume" in err
    from instructkit.engine.checkpoint import verify_checkpoint
    assert verify_checkpoint(ckpt) is None

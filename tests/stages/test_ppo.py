"""PPO end to end on tiny models (CPU)."""

import json
from pathlib import Path

import pytest
import torch

from instructkit.config import PPOConfig, RMConfig, SFTConfig, load_config
from instructkit.stages import ppo, rm, sft

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sft_policy(tmp_path_factory):
    """A tiny LLaMA fine-tuned on English text, so that "the" is a word it already says."""
    out = tmp_path_factory.mktemp("sft")
    cfg = load_config(SFTConfig, REPO / "configs/tiny/sft_full.yaml", [
        f"output_dir={out}", f"data.train={REPO / 'data/tinyshakespeare_small.txt'}", "data.format=text",
        "data.max_seq_len=128", "train.max_steps=80", "train.lr=2e-3", "train.eval_every=0",
        "train.save_every=0", "log.tensorboard=false"])
    return sft.run(cfg).final_dir


def ppo_cfg(tmp_path, *overrides, name="ppo"):
    return load_config(PPOConfig, REPO / "configs/tiny/ppo.yaml", [
        f"output_dir={tmp_path / name}", f"data.train={REPO / 'data/selfinstruct_seed_tasks.jsonl'}",
        "log.tensorboard=false", "rollout.prompts_per_step=8", "rollout.micro_batch_size=8",
        "rollout.max_new_tokens=8", "ppo.mini_batch_size=4", "train.max_steps=4", "train.save_every=0",
        *overrides])


def steps(run_dir):
    rows = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "reward_mean" in r]


RISE = ["adapter.kind=none", "train.lr=1e-3", "train.max_steps=24", "rollout.prompts_per_step=32",
        "rollout.micro_batch_size=32", "ppo.mini_batch_size=16", "rollout.max_new_tokens=16"]


@pytest.fixture(scope="module")
def free_run(tmp_path_factory, sft_policy):
    """PPO from the SFT policy with the default small KL coefficient."""
    tmp = tmp_path_factory.mktemp("ppo")
    cfg = ppo_cfg(tmp, f"policy.name_or_path={sft_policy}", f"ppo.value_name_or_path={sft_policy}", *RISE)
    ppo.run(cfg)
    return steps(cfg.output_dir), cfg.output_dir


def test_reward_rises_while_kl_stays_bounded(free_run):
    rows, out = free_run
    first = sum(r["reward_mean"] for r in rows[:6]) / 6
    last = sum(r["reward_mean"] for r in rows[-6:]) / 6
    assert last > 2.5 * first and last > 0.05, [round(r["reward_mean"], 3) for r in rows]
    assert max(r["kl"] for r in rows) < 10.0
    for key in ("policy_loss", "value_loss", "response_len", "clipfrac", "approx_kl", "entropy",
                "explained_variance", "no_eos_share", "time_generate", "time_train", "gen_tokens_per_s"):
        assert key in rows[-1]
    samples = [json.loads(l) for l in (Path(out) / "samples.jsonl").read_text().splitlines()]
    assert samples and {"prompt", "response", "reward"} <= set(samples[0])


def test_large_kl_coefficient_keeps_the_policy_at_the_reference(tmp_path, sft_policy, free_run):
    held = ppo_cfg(tmp_path, f"policy.name_or_path={sft_policy}", f"ppo.value_name_or_path={sft_policy}", *RISE,
                   "ppo.kl_coef=50.0")
    ppo.run(held)
    rows = steps(held.output_dir)
    kl_free = sum(r["kl"] for r in free_run[0][-6:]) / 6
    kl_held = sum(r["kl"] for r in rows[-6:]) / 6
    reward_free = sum(r["reward_mean"] for r in free_run[0][-6:]) / 6
    reward_held = sum(r["reward_mean"] for r in rows[-6:]) / 6
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
    from instructkit.engine import step as S

    common = ["train.max_steps=4", "train.save_every=2", "ppo.ptx_coef=0.1",
              f"ppo.ptx_data={REPO / 'data/selfinstruct_seed_tasks.jsonl'}"]
    ppo.run(ppo_cfg(tmp_path, *common, name="full"))
    cut = ppo_cfg(tmp_path, *common, name="cut")
    real = ppo.optimizer_step
    calls = {"n": 0}

    def flaky(model, optimizer, max_grad_norm, guard, loss, step):
        if step == 2:
            raise KeyboardInterrupt
        return real(model, optimizer, max_grad_norm, guard, loss, step)

    monkeypatch.setattr(ppo, "optimizer_step", flaky)
    with pytest.raises(KeyboardInterrupt):
        ppo.run(cut)
    monkeypatch.undo()
    ppo.run(cut, resume=True)
    a, b = steps(tmp_path / "full"), steps(tmp_path / "cut")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("reward_mean", "kl", "policy_loss", "value_loss", "ptx_loss"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], abs=1e-6), key


def test_bad_reward_function_is_a_clear_error(tmp_path, capsys):
    from instructkit.cli import main

    code = main(["ppo", str(REPO / "configs/tiny/ppo.yaml"), f"output_dir={tmp_path / 'x'}",
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
        cfg = load_config(PPOConfig, repo / "configs/tiny/ppo.yaml", ["policy.freeze_layers=1", "policy.device=cpu"])
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
    from instructkit.engine.step import NonFiniteGuard

    grads, calls = {}, []

    def capture(model, optimizer, max_grad_norm, guard, loss, step):
        for n, p in model.named_parameters():
            if p.grad is not None:
                grads[n] = p.grad.clone()
        optimizer.zero_grad(set_to_none=True)

    monkeypatch.setattr(ppo, "optimizer_step", capture)
    layer = M.decoder_layers(actors.policy)[0].input_layernorm
    hook = layer.register_forward_pre_hook(lambda *a: calls.append(1))
    torch.manual_seed(0)
    try:
        ppo.ppo_update(actors, ppo.build_ppo_optimizer(actors, cfg, torch.device("cpu")), exp, batch, cfg,
                       NonFiniteGuard(5), 0, None, policy_on=True)
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

    over = (["adapter.kind=none", "ppo.value_name_or_path=tiny-llama"] if layout == "separate"
            else ["adapter.dropout=0.1"])  # dropout is switched off: checkpointing's recompute matches
    cfg = ppo_cfg(tmp_path, *over, "policy.gradient_checkpointing=true", "ppo.epochs=1", "ppo.mini_batch_size=8")
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

"""RLHF with PPO (InstructGPT step 3): policy, value model, frozen reward, frozen reference.

Each PPO step: sample responses to a batch of prompts (KV cache), score them, compute the
old and reference log-probs and the values, turn scores and per-token KL into rewards,
GAE advantages, then a few epochs of clipped policy and value updates over mini-batches.
The maths are pure functions in ``instructkit.losses.rl``; sampling and the log-prob / value /
score passes are ``instructkit.rollout``.

Two memory layouts:
  shared base (adapter.kind lora/dora/qlora): ONE copy of the base weights. The policy is
    adapter "default", the reference is the base with adapters switched off, the value model
    is adapter "value" plus a scalar head initialised from the reward model's head.
  separate models (adapter.kind none): a trainable policy, a frozen reference copy, a
    trainable value model (from the reward model), with ``ppo.offload_frozen`` moving the
    frozen models to CPU while training.
The reward model is always separate (or a Python function).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from instructkit import models as M
from instructkit import rollout as RO
from instructkit.atomic import replace_dir
from instructkit.config import AdapterConfig, PPOConfig, to_dict
from instructkit.data.prompts import load_prompts
from instructkit.engine import distributed as D
from instructkit.engine import run as R
from instructkit.engine.batches import BatchStream
from instructkit.engine.optim import build_optimizer, total_steps
from instructkit.engine.runtime import autocast, peak_memory_gb, seed_everything
from instructkit.errors import UserError
from instructkit.losses import rl
from instructkit.models import resolve_device
from instructkit.redact import redact
from instructkit.stages.rl_common import (
    check_same_vocab, check_start_exists, frozen_copy, load_frozen_reward, mean_over_ranks, reference_of,
    rollout_stop_ids, write_samples,
)


@dataclass
class PPOResult:
    output_dir: Path
    final_dir: Path
    steps: int
    last_metrics: dict
    models: object = None  # the Actors, in memory (tests, pipeline)


# --------------------------------------------------------------------------- the four roles


class Actors:
    """Policy, reference, value and reward, in one of the two layouts.

    ``trainable`` is the module whose parameters the optimizer and checkpoints hold.
    """

    def __init__(self, cfg: PPOConfig, tokenizer, device):
        self.cfg, self.device = cfg, device
        self.shared = cfg.adapter.kind != "none"
        self.policy = M.load_model(cfg.policy, cfg.adapter, tokenizer, device)
        rollout_len = cfg.rollout.max_prompt_len + cfg.rollout.max_new_tokens
        what = "rollout.max_prompt_len + rollout.max_new_tokens"
        M.check_context_length(self.policy, rollout_len, what, cfg.policy.name_or_path)
        if cfg.ppo.ptx_coef:
            M.check_context_length(self.policy, cfg.data.max_seq_len, "data.max_seq_len (ppo.ptx_data)",
                                   cfg.policy.name_or_path)
        # No dropout, in train mode (which gradient checkpointing needs): the first epoch's
        # ratio must be exactly 1, as the clipped objective assumes.
        M.disable_dropout(self.policy)
        self.reward_model = None
        if cfg.reward.name_or_path:
            self.reward_model = load_frozen_reward(cfg, device)
            M.check_context_length(self.reward_model, rollout_len, what, cfg.reward.name_or_path)
            check_same_vocab(self.reward_model, self.policy, cfg.reward.name_or_path)
        if self.shared:
            # LoRA weights left trainable by loading (policy.freeze_layers freezes the first
            # layers' adapters too); the value adapter follows the same pattern.
            self.lora_trainable = {n for n, p in self.policy.named_parameters() if "lora_" in n and p.requires_grad}
            self.lora_trainable |= {n.replace(".default.", ".value.") for n in self.lora_trainable}
            self.policy.add_adapter("value", copy.deepcopy(self.policy.peft_config["default"]))
            self.value_head = value_head_like(self.policy, self.reward_model).to(device)
            self.ref_copy = None
            self.value_model = None
            self.trainable = nn.ModuleDict({"policy": self.policy, "value_head": self.value_head})
            self.use("default")
        else:
            self.ref_copy = frozen_copy(cfg, tokenizer, device)
            value_path = cfg.ppo.value_name_or_path or cfg.reward.name_or_path
            if value_path is None:
                raise UserError("with adapter.kind=none and a reward function, set ppo.value_name_or_path "
                                "(a model to initialise the value model from)")
            value_cfg = replace(cfg.policy, name_or_path=value_path)
            self.value_model = M.load_reward_model(value_cfg, AdapterConfig(kind="none"), tokenizer, device)
            M.disable_dropout(self.value_model)
            self.trainable = nn.ModuleDict({"policy": self.policy, "value": self.value_model})
        # every pass of the trainable models goes through this; run() replaces it with the
        # distributed handle under torchrun
        self.wrapped = D.wrapped(self.trainable)

    # -- adapters (shared layout) -------------------------------------------------------
    def use(self, name: str) -> None:
        """Make adapter ``name`` the active one, keeping BOTH adapters trainable (peft's
        set_adapter freezes the inactive one; the optimizer and checkpoints hold both), except
        in layers that ``policy.freeze_layers`` froze."""
        self.policy.set_adapter(name)
        for n, p in self.policy.named_parameters():
            if "lora_" in n:
                p.requires_grad_(n in self.lora_trainable)

    def reference(self):
        """The frozen reference: the base with adapters off, or the frozen copy."""
        return reference_of(self.policy, None if self.shared else self.ref_copy)

    @contextlib.contextmanager
    def value_adapter(self):
        """The value adapter active inside (shared layout; nothing to do otherwise). A pass
        that backpropagates must run its backward inside too: gradient checkpointing
        recomputes the layers in backward with whichever adapter is active then."""
        if not self.shared:
            yield
            return
        before = self.policy.active_adapter
        self.use("value")
        try:
            yield
        finally:
            self.use(before)

    def values_fn(self, ids, mask, pos) -> torch.Tensor:
        """Per-position values [B, L]."""
        if not self.shared:
            return RO.token_values(self.value_model, ids, mask, pos)
        with self.value_adapter():
            hidden = self.policy.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos,
                                               use_cache=False).last_hidden_state
            return self.value_head(hidden).squeeze(-1).float()

    def run(self, fn):
        """``fn()`` as one forward of the distributed root (FSDP2 gathers the sharded policy
        and value model there); in one process just ``fn()``."""
        return self.wrapped(lambda _module: fn())

    def frozen_to(self, device) -> None:
        for m in (self.ref_copy, self.reward_model):
            if m is not None:
                m.to(device)


def value_head_like(policy, reward_model) -> nn.Linear:
    """A scalar head on the policy's hidden size, initialised from the reward model's head
    when the sizes match (InstructGPT initialises the value model from the reward model)."""
    hidden = policy.get_input_embeddings().weight.shape[1]
    head = nn.Linear(hidden, 1, bias=False)
    nn.init.zeros_(head.weight)
    if reward_model is not None:
        w = M.score_head(reward_model).weight
        if w.shape == head.weight.shape:
            with torch.no_grad():
                head.weight.copy_(w.float())
    return head


# --------------------------------------------------------------------------- one rollout


@torch.no_grad()
def make_experience(actors: Actors, tokenizer, prompts, cfg: PPOConfig, kl_coef: float,
                    moments: rl.RunningMoments, reward_stats, reward_fn, stop_ids: list[int]):
    """Sample, score and turn into advantages.

    Returns (experience tensors for the update, metrics, the rollout batch, raw scores [B]).
    """
    ro, device, precision = cfg.rollout, actors.device, cfg.policy.precision
    times = {}
    t0 = time.perf_counter()
    with autocast(precision, device):
        batch = actors.run(lambda: RO.sample(
            actors.policy, tokenizer, [ids for _, ids in prompts], prompts=[t for t, _ in prompts],
            max_new_tokens=ro.max_new_tokens, temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k,
            stop_ids=stop_ids, batch_size=ro.micro_batch_size, synced_gpus=D.active()))
    batch = batch.to(device)
    times["time_generate"] = time.perf_counter() - t0
    gen_tokens = int(batch.response_mask.sum())
    t0 = time.perf_counter()
    with autocast(precision, device):
        raw = RO.score_responses(actors.reward_model if actors.reward_model is not None else reward_fn, batch,
                                 ro.micro_batch_size).float()
        old_logp = actors.run(lambda: RO.response_logprobs(actors.policy, batch, ro.micro_batch_size, ro.temperature))
        with actors.reference() as ref:
            ref_logp = actors.run(lambda: RO.response_logprobs(ref, batch, ro.micro_batch_size, ro.temperature))
        actors.trainable.eval()
        values = actors.run(lambda: RO.response_values(actors.values_fn, batch, ro.micro_batch_size))
        actors.trainable.train()
    times["time_score"] = time.perf_counter() - t0

    mask = batch.response_mask.float()  # [B, T]
    scores = raw
    if cfg.reward.normalization() == "stored":
        scores = rl.normalize_scores(scores, *reward_stats)
    elif cfg.reward.normalization() == "running":
        moments.update(D.gather_cat(raw))  # every rank's scores: the same statistics everywhere
        scores = rl.normalize_scores(scores, moments.mean, moments.std)
    scores = rl.clip_scores(scores, cfg.reward.clip)
    scores = rl.penalize_no_eos(scores, batch.reached_eos, cfg.reward.no_eos_penalty)
    kl = rl.KL_ESTIMATORS[cfg.ppo.kl_estimator](old_logp, ref_logp) * mask  # [B, T]
    rewards = rl.per_token_rewards(scores, kl, kl_coef, mask)
    advantages, returns = rl.gae(rewards, values, mask, cfg.ppo.gamma, cfg.ppo.lam)
    if cfg.ppo.whiten_advantages:  # under torchrun: with the mean and variance over all ranks
        advantages = rl.masked_whiten(advantages, mask, sum_over_ranks=D.sum_over_ranks if D.active() else None)
    exp = {"old_logp": old_logp, "values": values, "advantages": advantages, "returns": returns, "mask": mask}
    metrics = {k: float(v) for k, v in rl.rollout_metrics(kl, mask, batch.reached_eos, scores).items()}
    metrics.update(**times, gen_tokens_per_s=gen_tokens / max(times["time_generate"], 1e-9),
                   response_len=metrics.pop("response_length"))
    metrics = mean_over_ranks(metrics)
    every_raw = D.gather_cat(raw)
    metrics.update(reward_mean=float(every_raw.mean()), reward_std=float(every_raw.std(correction=0)))
    return exp, metrics, batch, raw


# --------------------------------------------------------------------------- the run


def run(cfg: PPOConfig, resume: bool = False, allow_new_data: bool = False) -> PPOResult:
    value = cfg.ppo.value_name_or_path if cfg.adapter.kind == "none" else None  # (LoRA: an adapter)
    check_start_exists({"policy.name_or_path": cfg.policy.name_or_path, "ppo.value_name_or_path": value},
                       "configs/tiny/ppo.yaml")
    out = Path(cfg.output_dir)
    R.prepare_output_dir(out, resume)
    device = resolve_device(cfg.policy.device)
    seed_everything(cfg.train.seed)
    with D.main_first():  # rank 0 fills the model caches first
        tokenizer = M.load_tokenizer(cfg.policy)
        prompts = load_prompts(cfg.data, tokenizer, cfg.rollout.max_prompt_len)
        reward_fn = RO.load_reward_function(cfg.reward.function) if cfg.reward.function else None
        actors = Actors(cfg, tokenizer, device)
    # torchrun: the policy and value model are sharded with FSDP2; the frozen reward model and
    # reference copy are replicated on every rank.
    actors.wrapped = D.wrap(actors.trainable, cfg.distributed, cfg.policy.precision, device)
    stop_ids = rollout_stop_ids(cfg, tokenizer, actors.policy)
    reward_stats = (M.load_reward_stats(cfg.reward.name_or_path) if cfg.reward.normalization() == "stored"
                    else (0.0, 1.0))
    optimizer = build_ppo_optimizer(actors, cfg, device)
    ptx = PtxSource(cfg, tokenizer, device) if cfg.ppo.ptx_coef else None
    R.write_config(cfg, out)
    t, p = cfg.train, cfg.ppo
    world = D.world_size()

    def plan(epoch: int):  # batches of prompt indices (prompts_per_step per rank), a seeded shuffle per epoch
        g = torch.Generator().manual_seed(t.seed * 1000 + epoch)
        order = torch.randperm(len(prompts), generator=g).tolist()
        n = cfg.rollout.prompts_per_step * world
        return [order[i:i + n] for i in range(0, len(order) - n + 1, n)] or [order]

    kl_ctl = (rl.AdaptiveKLController(p.kl_coef, p.kl_target, p.kl_horizon) if p.kl_target is not None
              else rl.FixedKLController(p.kl_coef))
    moments = rl.RunningMoments()
    # a plan entry is one step of every rank (train.grad_accum is 1)
    run = R.TrainingRun("ppo", out, actors.wrapped, optimizer, plan, total_steps(t, len(plan(0))), t, cfg.log,
                        redact(to_dict(cfg)), cfg.policy.precision, cfg.policy.attn_implementation, resume,
                        allow_new_data)
    if "kl_ctl" in run.loop:
        kl_ctl.load_state_dict(run.loop["kl_ctl"]), moments.load_state_dict(run.loop["moments"])
        if ptx is not None:
            ptx.stream.load_state_dict(run.loop["ptx_stream"])
    run.log_start({"n_prompts": len(prompts), "layout": "shared_base" if actors.shared else "separate"})
    metrics: dict = {}
    while run.step < run.total:
        run.set_lr()
        batch_prompts = [prompts[i] for i in D.rank_slice(run.stream.next())]  # this rank's share
        try:
            exp, metrics, batch, raw = make_experience(actors, tokenizer, batch_prompts, cfg, kl_ctl.value, moments,
                                                       reward_stats, reward_fn, stop_ids)
        except UserError as e:  # e.g. the reward function failed: say where the run can go on from
            raise type(e)(f"step {run.step + 1}: {e}; {R.resume_hint(out)}") from None
        if cfg.ppo.offload_frozen:
            actors.frozen_to("cpu")
        t0 = time.perf_counter()
        update_metrics = ppo_update(actors, run, exp, batch, cfg, ptx, policy_on=run.step >= p.value_warmup_steps)
        metrics.update(update_metrics, time_train=time.perf_counter() - t0)
        if cfg.ppo.offload_frozen:
            actors.frozen_to(device)
        kl_ctl.update(metrics["kl"], len(batch) * world)
        run.step += 1
        metrics.update(kl_coef=kl_ctl.value, lr=run.lr(), skipped_steps=run.guard.total,
                       peak_mem_gb=peak_memory_gb(device),
                       **mean_over_ranks({"explained_variance": rl.explained_variance(
                           exp["values"], exp["returns"], exp["mask"])}))
        run.log(metrics, reward=metrics["reward_mean"], kl=metrics["kl"])
        if D.is_main():
            write_samples(out, run.logger, run.step, batch, raw, cfg.log.every)
        run.loop.update(kl_ctl=kl_ctl.state_dict(), moments=moments.state_dict())
        if ptx is not None:
            run.loop["ptx_stream"] = ptx.stream.state_dict()
        if R.due(run.step, t.save_every):
            run.save()
    run.end()
    final = R.publish_final(out, actors.wrapped, lambda full: save_ppo_final(actors, tokenizer, cfg, out / "final"))
    R.release_output_dir(out)
    return PPOResult(out, final, run.step, metrics, actors)


def build_ppo_optimizer(actors: Actors, cfg: PPOConfig, device):
    """One AdamW with a policy group and a value group (separate learning rates)."""
    if actors.shared:
        policy = [(n, p) for n, p in actors.policy.named_parameters() if "lora_" in n and ".value." not in n]
        value = [(n, p) for n, p in actors.policy.named_parameters() if "lora_" in n and ".value." in n]
        value += list(actors.value_head.named_parameters())
    else:
        policy, value = list(actors.policy.named_parameters()), list(actors.value_model.named_parameters())
    return build_optimizer({"policy": (policy, cfg.train.lr), "value": (value, cfg.ppo.value_lr or cfg.train.lr)},
                           cfg.train, device)


def ppo_update(actors: Actors, run: R.TrainingRun, exp: dict, batch: RO.RolloutBatch, cfg: PPOConfig,
               ptx, policy_on: bool) -> dict:
    """PPO epochs over the rollout in shuffled mini-batches, each an optimizer step of ``run``
    (its guard, at its current step); returns mean statistics."""
    p, device, precision = cfg.ppo, actors.device, cfg.policy.precision
    stats: dict[str, list[float]] = {}
    n = len(batch)
    for _ in range(p.epochs):  # in train mode: dropout is off (Actors), checkpointing on if set
        for rows in torch.randperm(n).split(p.mini_batch_size):
            mb = batch.select(rows)
            e = {k: v[rows.to(v.device)] for k, v in exp.items()}

            # Two passes, each one forward of the distributed root and its backward: the value
            # pass's backward must run with the value adapter active (see Actors.value_adapter).
            def policy_pass():
                with autocast(precision, device):
                    logp, entropy = RO.forward_response_logprobs(actors.policy, mb, cfg.rollout.temperature,
                                                                 with_entropy=True)
                    pg_loss, pg_stats = rl.policy_loss_clipped(logp, e["old_logp"], e["advantages"], e["mask"], p.clip)
                    loss = pg_loss + rl.entropy_bonus(entropy, e["mask"], p.entropy_coef)
                    if ptx is not None and policy_on:
                        ptx_loss = ptx.loss(actors.policy)
                        loss = rl.mix_ptx_loss(loss, ptx_loss, p.ptx_coef)
                        stats.setdefault("ptx_loss", []).append(float(ptx_loss.detach()))
                return loss, pg_loss, pg_stats, entropy

            def value_pass():
                with autocast(precision, device):
                    values = RO.forward_response_values(actors.values_fn, mb)
                    vf_loss, vf_stats = rl.value_loss_clipped(values, e["values"], e["returns"], e["mask"], p.value_clip)
                return p.vf_coef * vf_loss, vf_loss, vf_stats

            with torch.set_grad_enabled(policy_on):  # value warm-up: the policy's statistics only
                loss, pg_loss, pg_stats, entropy = actors.run(policy_pass)
                if policy_on:
                    loss.backward()
            with actors.value_adapter():
                v_loss, vf_loss, vf_stats = actors.run(value_pass)
                v_loss.backward()
            loss = (float(loss.detach()) if policy_on else 0.0) + float(v_loss.detach())
            norms = clip_groups(run.optimizer, cfg.train.max_grad_norm, actors.trainable)
            run.optimizer_step(D.global_sum(loss) / D.world_size(), None)  # the mean over ranks
            for k, v in {"policy_loss": pg_loss, "value_loss": vf_loss, **pg_stats, **vf_stats,
                         "entropy": rl.masked_mean(entropy.detach(), e["mask"]), **norms}.items():
                stats.setdefault(k, []).append(float(v.detach()) if torch.is_tensor(v) else float(v))
    return mean_over_ranks({k: sum(v) / len(v) for k, v in stats.items()})


def clip_groups(optimizer, max_norm: float | None, model) -> dict:
    """Clip the policy's and the value model's gradients separately (their scales differ); each
    part's decay and no-decay groups together, in the model's parameter order (the norm's sum
    does not depend on how the optimizer grouped them)."""
    order = {id(q): i for i, q in enumerate(model.parameters())}
    parts: dict[str, list] = {}  # "policy" and "value", each with its no-decay group
    for g in optimizer.param_groups:
        parts.setdefault(g["name"].removesuffix(".no_decay"), []).extend(q for q in g["params"] if q.grad is not None)
    out = {}
    for name, params in parts.items():
        params.sort(key=lambda q: order.get(id(q), len(order)))
        if params:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
            out[f"grad_norm_{name}"] = D.plain_norm(norm)
    return out


class PtxSource:
    """InstructGPT's pretraining mix: an SFT batch's LM loss added to the policy loss."""

    def __init__(self, cfg: PPOConfig, tokenizer, device):
        from instructkit import data

        data_cfg = replace(cfg.data, train=cfg.ppo.ptx_data, format="auto", val_fraction=0.0, golden=None,
                           validation=None)
        self.examples = data.build_sft_data(data_cfg, tokenizer, seed=cfg.train.seed).train
        lengths = [len(e["input_ids"]) for e in self.examples]
        self.stream = BatchStream(lambda epoch: data.plan_micro_batches(
            lengths, cfg.ppo.mini_batch_size, data_cfg.max_seq_len, data_cfg.packing, data_cfg.group_by_length,
            seed=cfg.train.seed, epoch=epoch))
        self.collate = functools.partial(data.collate, pad_id=tokenizer.pad_token_id,
                                         attn_implementation=cfg.policy.attn_implementation)
        self.device, self.chunk_size = device, cfg.train.loss_chunk_size

    def loss(self, policy) -> torch.Tensor:
        from instructkit.engine.lm import lm_loss_sum, to_device

        rows = self.stream.take(D.world_size())[D.rank()]  # each rank its own batch
        batch = to_device(self.collate(self.examples, rows), self.device)
        total, n = lm_loss_sum(policy, batch, self.chunk_size)
        return total / max(n, 1)


def save_ppo_final(actors: Actors, tokenizer, cfg: PPOConfig, final: Path) -> Path:
    """final/ = the policy (adapter or model, loadable like an SFT result); final/value/ = the
    value model (the value adapter + value_head.safetensors, or a sequence-classification model).
    Both are written into one temporary folder published by one rename: there is never a
    final/ without its value model."""
    import shutil

    from safetensors.torch import save_file

    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        if actors.shared:  # the value adapter first: the policy's folder must hold only "default"
            actors.policy.save_pretrained(str(tmp / "value"), selected_adapters=["value"],
                                          save_embedding_layers=False)
            save_file({"weight": actors.value_head.weight.detach().cpu().contiguous()},
                      tmp / "value" / "value_head.safetensors")
            actors.policy.delete_adapter("value")
            actors.policy.set_adapter("default")
        else:
            M.save_reward_model(actors.value_model, tokenizer, tmp / "value", cfg.policy, 0.0, 1.0)
        M.write_final(actors.policy, tokenizer, tmp, cfg.policy, cfg.adapter)
        replace_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final

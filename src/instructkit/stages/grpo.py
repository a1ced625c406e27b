"""Critic-free RL: GRPO, Dr. GRPO, RLOO and REINFORCE++ in one stage.

Each step: take ``rollout.prompts_per_step`` prompts (per rank), sample ``grpo.group_size``
answers to each, score them (a reward model and / or reward functions, e.g. the verifiable
ones of :mod:`instructkit.rewards`), turn the scores into advantages with the group as the
baseline, then ``grpo.epochs`` passes of the clipped per-token loss over mini-batches of
``grpo.mini_batch_size`` answers, each an optimizer step of the shared
:class:`~instructkit.engine.run.TrainingRun` (schedule, guard, checkpoints, exact resume) whose
micro-batches go through :func:`~instructkit.engine.fit.accumulate_batches`. The maths are the
pure functions of :mod:`instructkit.losses.group`.

No value model. The reference (only when ``grpo.kl_coef`` > 0): with LoRA the base with the
adapters off (one copy of the weights), with full fine-tuning a frozen copy. The G answers to
one prompt are always on one rank, so the group baselines need no communication.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from instructkit import models as M
from instructkit import rollout as RO
from instructkit.config import GRPOConfig, to_dict
from instructkit.data.prompts import load_prompt_rows
from instructkit.engine import distributed as D
from instructkit.engine import run as R
from instructkit.engine.fit import accumulate_batches
from instructkit.engine.optim import build_optimizer, total_steps
from instructkit.engine.runtime import autocast, peak_memory_gb, seed_everything
from instructkit.errors import UserError
from instructkit.losses import group as G
from instructkit.losses import rl
from instructkit.models import resolve_device
from instructkit.redact import redact
from instructkit.stages.rl_common import (
    check_same_vocab, check_start_exists, frozen_copy, load_frozen_reward, mean_over_ranks, reference_of,
    rollout_stop_ids, write_samples,
)


@dataclass
class GRPOResult:
    output_dir: Path
    final_dir: Path
    steps: int
    last_metrics: dict
    policy: object = None  # in memory (tests, pipeline)


# --------------------------------------------------------------------------- roles and rewards


class Roles:
    """The trainable policy and, when ``grpo.kl_coef`` > 0, the frozen reference."""

    def __init__(self, cfg: GRPOConfig, tokenizer, device):
        self.policy = M.load_model(cfg.policy, cfg.adapter, tokenizer, device)
        M.check_context_length(self.policy, cfg.rollout.max_prompt_len + cfg.rollout.max_new_tokens,
                               "rollout.max_prompt_len + rollout.max_new_tokens", cfg.policy.name_or_path)
        M.disable_dropout(self.policy)  # the first pass's ratio must be exactly 1
        self.shared = cfg.adapter.kind != "none"
        self.has_reference = cfg.grpo.kl_coef > 0
        self.ref_copy = frozen_copy(cfg, tokenizer, device) if self.has_reference and not self.shared else None
        self.wrapped = D.wrapped(self.policy)  # run() replaces it with the distributed handle under torchrun

    def reference(self):
        return reference_of(self.policy, None if self.shared else self.ref_copy)


class Rewarder:
    """The step's scores: ``model_weight`` x the reward model's score plus the weighted reward
    functions, each part kept for its own metrics. ``field_names``: what the prompt records
    have beside the prompt (for the functions that ask for them)."""

    def __init__(self, cfg: GRPOConfig, device, field_names: set[str], policy):
        r = cfg.reward
        self.model, self.stats, self.weight = None, (0.0, 1.0), r.model_weight
        if r.name_or_path:
            self.model = load_frozen_reward(cfg, device)
            M.check_context_length(self.model, cfg.rollout.max_prompt_len + cfg.rollout.max_new_tokens,
                                   "rollout.max_prompt_len + rollout.max_new_tokens", r.name_or_path)
            check_same_vocab(self.model, policy, r.name_or_path)
            if r.normalize == "stored":
                self.stats = M.load_reward_stats(r.name_or_path)
        self.terms = []  # (name, weight, callable, the record fields it takes)
        for term in r.terms():
            fn = RO.load_reward_function(term.function)
            fields = RO.reward_fields(fn, term.function, field_names, term.kwargs)
            name = term.function.rsplit(":", 1)[1].rsplit(".", 1)[-1]
            taken = {t[0] for t in self.terms} | ({"model"} if self.model is not None else set())
            name = name if name not in taken else f"{name}_{len(self.terms)}"
            self.terms.append((name, term.weight, functools.partial(fn, **term.kwargs), fields))

    def score(self, batch: RO.RolloutBatch, row_fields: list[dict], micro_batch_size: int):
        """(total score [B], {part name: raw score [B]})."""
        parts, total = {}, torch.zeros(len(batch), device=batch.prompt_ids.device)
        if self.model is not None:
            raw = RO.reward_model_scores(self.model, batch, micro_batch_size).float()
            parts["model"] = raw
            total = total + self.weight * rl.normalize_scores(raw, *self.stats)
        for name, weight, fn, fields in self.terms:
            values = {f: [row[f] for row in row_fields] for f in fields}
            parts[name] = RO.function_scores(fn, batch, values)
            total = total + weight * parts[name]
        return total, parts


# --------------------------------------------------------------------------- one rollout


def sample_groups(roles: Roles, tokenizer, rows: list, cfg: GRPOConfig, stop_ids: list[int]):
    """G answers to each prompt of ``rows`` (prompt-major). Returns (batch, the fields of each row)."""
    ro, G_ = cfg.rollout, cfg.grpo.group_size
    with autocast(cfg.policy.precision, next(roles.policy.parameters()).device):
        batch = roles.wrapped(lambda _m: RO.sample(
            roles.policy, tokenizer, [r[1] for r in rows for _ in range(G_)],
            prompts=[r[0] for r in rows for _ in range(G_)], max_new_tokens=ro.max_new_tokens,
            temperature=ro.temperature, top_p=ro.top_p, top_k=ro.top_k, stop_ids=stop_ids,
            batch_size=ro.micro_batch_size, synced_gpus=D.active()))
    return batch, [r[2] for r in rows for _ in range(G_)]


def dynamic_sampling(sampled, draw, roles, rewarder, tokenizer, cfg: GRPOConfig, stop_ids):
    """DAPO's dynamic sampling: replace the groups whose answers all score the same (no signal)
    by groups with signal from rollouts of new prompts (``draw()``: this rank's next prompts),
    up to ``grpo.resample_rounds`` extra rollouts; every rank rolls out as long as any has such
    a group (a sharded policy needs every rank in each forward). Returns what it was given,
    with the groups replaced, and the rounds it took."""
    batch, fields, total, parts = sampled
    G_, pad, rounds = cfg.grpo.group_size, tokenizer.pad_token_id, 0
    while rounds < cfg.grpo.resample_rounds and D.global_sum(int(G.equal_groups(total, G_).sum())) > 0:
        rounds += 1
        nb, nf = sample_groups(roles, tokenizer, draw(), cfg, stop_ids)
        nt, np_ = rewarder.score(nb, nf, cfg.rollout.micro_batch_size)
        dead = G.equal_groups(total, G_).nonzero().flatten().tolist()
        live = (~G.equal_groups(nt, G_)).nonzero().flatten().tolist()
        for old, new in zip(dead, live):  # group `old` of the batch becomes group `new` of the new one
            keep = [i for i in range(len(batch)) if i // G_ != old]
            add = list(range(new * G_, new * G_ + G_))
            batch = RO.concat_batches([batch.select(keep), nb.select(add)], pad)
            fields = [f for i, f in enumerate(fields) if i // G_ != old] + [nf[i] for i in add]
            total = torch.cat([total[keep], nt[add]])
            parts = {k: torch.cat([v[keep], np_[k][add]]) for k, v in parts.items()}
    return (batch, fields, total, parts), rounds


@torch.no_grad()
def advantages(total: torch.Tensor, kl: torch.Tensor | None, mask: torch.Tensor, cfg: GRPOConfig) -> torch.Tensor:
    """Advantages [B] (group baselines) or [B, T] (reinforce_pp) from the scores [B]; with
    ``grpo.kl_mode=reward`` the per-token KL ``kl`` [B, T] is a penalty in the reward."""
    g = cfg.grpo
    kl_in_reward = g.kl_coef if kl is not None and g.kl_mode == "reward" else 0.0
    if g.advantage == "reinforce_pp":
        return G.reinforce_pp_advantages(total, kl if kl is not None else torch.zeros_like(mask), kl_in_reward, mask,
                                         g.gamma, sum_over_ranks=D.sum_over_ranks if D.active() else None)
    if kl_in_reward:
        total = total - kl_in_reward * (kl * mask).sum(1)
    if g.advantage == "grpo":
        return G.grpo_advantages(total, g.group_size, g.std_eps)
    if g.advantage == "dr_grpo":
        return G.dr_grpo_advantages(total, g.group_size)
    return G.rloo_advantages(total, g.group_size)


KL = {"k1": rl.kl_k1, "k2": G.kl_k2, "k3": rl.kl_k3}  # per-token estimators [B, T]


def make_experience(roles: Roles, rewarder: Rewarder, tokenizer, rows: list, draw, cfg: GRPOConfig, stop_ids):
    """Sample and score the groups (with dynamic sampling), the log-probs the update needs and
    the advantages. Returns (experience tensors, metrics, batch, total scores [B], parts)."""
    ro, g = cfg.rollout, cfg.grpo
    t0 = time.perf_counter()
    batch, fields = sample_groups(roles, tokenizer, rows, cfg, stop_ids)
    total, parts = rewarder.score(batch, fields, ro.micro_batch_size)
    (batch, fields, total, parts), rounds = dynamic_sampling((batch, fields, total, parts), draw, roles, rewarder,
                                                             tokenizer, cfg, stop_ids)
    time_generate = time.perf_counter() - t0
    mask = batch.response_mask.float()  # [B, T]
    equal = G.equal_groups(total, g.group_size)  # [N]
    # a group without signal stays out of the loss (its advantages are 0 in any case but
    # reinforce_pp's, and it would dilute token_mean)
    loss_mask = mask * (~equal).repeat_interleave(g.group_size).float().unsqueeze(1)
    precision = cfg.policy.precision
    with autocast(precision, batch.prompt_ids.device):
        # on-policy (one pass, one mini-batch): the old log-probs are the update's own, detached
        one_step = g.epochs == 1 and g.mini_batch_size >= len(batch)
        need_old = not one_step or (g.kl_coef and g.kl_mode == "reward")
        old_logp = (roles.wrapped(lambda _m: RO.response_logprobs(roles.policy, batch, ro.micro_batch_size,
                                                                  ro.temperature)) if need_old else None)
        ref_logp = None
        if roles.has_reference:
            with roles.reference() as ref:
                ref_logp = roles.wrapped(lambda _m: RO.response_logprobs(ref, batch, ro.micro_batch_size,
                                                                         ro.temperature))
    kl = KL[g.estimator()](old_logp, ref_logp) * mask if g.kl_coef and g.kl_mode == "reward" else None
    exp = {"advantages": advantages(total, kl, mask, cfg), "loss_mask": loss_mask}
    exp.update({k: v for k, v in (("old_logp", old_logp), ("ref_logp", ref_logp)) if v is not None})
    gen_tokens = float(mask.sum())
    metrics = mean_over_ranks({"response_len": gen_tokens / len(batch),
                               "no_eos_share": 1.0 - float(batch.reached_eos.float().mean()),
                               "equal_group_share": float(equal.float().mean()),
                               "gen_tokens_per_s": gen_tokens / max(time_generate, 1e-9),
                               "time_generate": time_generate})
    metrics["resample_rounds"] = rounds
    every = D.gather_cat(total)
    metrics.update(reward_mean=float(every.mean()), reward_std=float(every.std(correction=0)))
    for name, v in parts.items():
        v = D.gather_cat(v)
        metrics.update({f"reward_{name}_mean": float(v.mean()), f"reward_{name}_std": float(v.std(correction=0))})
    return exp, metrics, batch, total, parts


def grpo_update(roles: Roles, run: R.TrainingRun, exp: dict, batch: RO.RolloutBatch, cfg: GRPOConfig) -> dict:
    """``grpo.epochs`` passes over the rollout in shuffled mini-batches, each an optimizer step
    of ``run`` whose micro-batches (``rollout.micro_batch_size`` answers) go through
    ``accumulate_batches``: the aggregation's (sum, count) normalised once over the mini-batch
    and the ranks. Returns mean statistics."""
    g, ro, precision = cfg.grpo, cfg.rollout, cfg.policy.precision
    stats: dict[str, list[float]] = {}

    def loss_fn(rows: torch.Tensor):
        mb = batch.select(rows)
        e = {k: v[rows.to(v.device)] for k, v in exp.items()}
        with autocast(precision, mb.prompt_ids.device):
            logp, entropy = roles.wrapped(lambda _m: RO.forward_response_logprobs(roles.policy, mb, ro.temperature,
                                                                                  with_entropy=True))
        old = e["old_logp"] if "old_logp" in e else logp.detach()
        per_token, st = G.clipped_token_loss(logp, old, e["advantages"], e["loss_mask"], g.clip, g.clip_high)
        m = mb.response_mask.float()
        if "ref_logp" in e:
            if g.kl_mode == "loss":
                per_token = per_token + g.kl_coef * KL[g.estimator()](logp, e["ref_logp"]) * e["loss_mask"]
            # k3: unbiased and never negative per token, unlike k1's sample mean
            st["kl"] = rl.masked_mean(rl.kl_k3(logp.detach(), e["ref_logp"]), m)
        st["entropy"] = rl.masked_mean(entropy.detach(), m)
        total, _ = G.aggregate(per_token, e["loss_mask"], g.loss_aggregation, ro.max_new_tokens)
        return total, {k: float(v) for k, v in st.items()}

    def count(rows: torch.Tensor) -> int:
        mask = exp["loss_mask"][rows.to(exp["loss_mask"].device)]
        return G.aggregate(torch.zeros_like(mask), mask, g.loss_aggregation, ro.max_new_tokens)[1]

    for _ in range(g.epochs):  # in train mode: dropout is off (Roles), checkpointing on if set
        for rows in torch.randperm(len(batch)).split(g.mini_batch_size):
            loss, parts = accumulate_batches(roles.wrapped, list(rows.split(ro.micro_batch_size)), count, loss_fn)
            result = run.optimizer_step(loss, cfg.train.max_grad_norm)
            stats.setdefault("policy_loss", []).append(loss)
            stats.setdefault("grad_norm", []).append(result.grad_norm)
            for part in parts:
                for k, v in part.items():
                    stats.setdefault(k, []).append(v)
    means = {k: sum(v) / len(v) for k, v in stats.items()}
    same = {k: means.pop(k) for k in ("policy_loss", "grad_norm")}  # already over all ranks
    return {**mean_over_ranks(means), **same}


# --------------------------------------------------------------------------- the run


def run(cfg: GRPOConfig, resume: bool = False, allow_new_data: bool = False) -> GRPOResult:
    check_start_exists({"policy.name_or_path": cfg.policy.name_or_path,
                        "reward.name_or_path": cfg.reward.name_or_path}, "configs/tiny/grpo.yaml")
    out = Path(cfg.output_dir)
    R.prepare_output_dir(out, resume)
    device = resolve_device(cfg.policy.device)
    seed_everything(cfg.train.seed)
    with D.main_first():  # rank 0 fills the model caches first
        tokenizer = M.load_tokenizer(cfg.policy)
        prompts = load_prompt_rows(cfg.data, tokenizer, cfg.rollout.max_prompt_len)
        roles = Roles(cfg, tokenizer, device)
        rewarder = Rewarder(cfg, device, set().union(*(r[2] for r in prompts)), roles.policy)
    # torchrun: the policy is sharded with FSDP2; the reward model and reference copy replicated
    roles.wrapped = D.wrap(roles.policy, cfg.distributed, cfg.policy.precision, device)
    stop_ids = rollout_stop_ids(cfg, tokenizer, roles.policy)
    t = cfg.train
    optimizer = build_optimizer({"policy": ([(n, p) for n, p in roles.policy.named_parameters()], t.lr)}, t, device)
    R.write_config(cfg, out)
    n = cfg.rollout.prompts_per_step * D.world_size()

    def plan(epoch: int):  # batches of prompt indices (prompts_per_step per rank), a seeded shuffle per epoch
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(t.seed * 1000 + epoch)).tolist()
        return [order[i:i + n] for i in range(0, len(order) - n + 1, n)] or [order]

    run = R.TrainingRun("grpo", out, roles.wrapped, optimizer, plan, total_steps(t, len(plan(0))), t, cfg.log,
                        redact(to_dict(cfg)), cfg.policy.precision, cfg.policy.attn_implementation, resume,
                        allow_new_data)

    def draw() -> list:  # this rank's share of the next batch of prompts
        return [prompts[i] for i in D.rank_slice(run.stream.next())]

    run.log_start({"n_prompts": len(prompts), "group_size": cfg.grpo.group_size,
                   "layout": "shared_base" if roles.shared else "separate"})
    metrics: dict = {}
    while run.step < run.total:
        run.set_lr()
        t0 = time.perf_counter()
        try:
            exp, metrics, batch, total, parts = make_experience(roles, rewarder, tokenizer, draw(), draw, cfg, stop_ids)
        except UserError as e:  # e.g. the reward function failed: say where the run can go on from
            raise type(e)(f"step {run.step + 1}: {e}; {R.resume_hint(out)}") from None
        t1 = time.perf_counter()
        metrics.update(grpo_update(roles, run, exp, batch, cfg))
        t2 = time.perf_counter()
        run.step += 1
        metrics.update(time_train=t2 - t1, time_generate_share=metrics["time_generate"] / max(t2 - t0, 1e-9),
                       lr=run.lr(), skipped_steps=run.guard.total, peak_mem_gb=peak_memory_gb(device))
        run.log(metrics, reward=metrics["reward_mean"], equal=metrics["equal_group_share"])
        if D.is_main():
            write_samples(out, run.logger, run.step, batch, total, cfg.log.every, k=min(len(batch), 2 * cfg.grpo.group_size),
                          extra={f"reward_{k}": v for k, v in parts.items()})
        if R.due(run.step, t.save_every):
            run.save()
    run.end()
    final = R.publish_final(out, roles.wrapped, lambda full: M.save_final(full, tokenizer, out / "final", cfg.policy,
                                                                          cfg.adapter))
    R.release_output_dir(out)
    return GRPOResult(out, final, run.step, metrics, roles.policy)

"""No setting is silently ignored: every key of every stage's schema is read by that stage's
runs, or is rejected when set, with the reason (``not_applicable`` in instructkit.config).

The walk runs each stage on tiny models in a few variants that together take every branch a
key is read on, records which keys the runs read (settings_trace), and checks the rest.
"""

from __future__ import annotations

import json
import logging
import sys
import types
from pathlib import Path

import pytest
import yaml

from instructkit.config import DPOConfig, GRPOConfig, PPOConfig, PretrainConfig, RMConfig, SFTConfig, load_config
from instructkit.errors import ConfigError
from instructkit.stages import dpo, grpo, ppo, pretrain, rm, sft

sys.path.insert(0, str(Path(__file__).parent))
from settings_trace import Reads, leaves, trace  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
QUIET = ["log.tensorboard=false", "log.progress=false"]
COMMON = ["train.max_steps=3", "train.warmup_steps=1", "train.min_lr=1e-5", "train.save_every=2", "train.keep_last=1",
          "train.eval_every=2", "train.early_stopping_patience=5", "train.eval_max_batches=1"]
EPOCHS = ["train.max_steps=null", "train.epochs=0.01"]
WANDB = ["log.wandb=true", "log.wandb_project=p", "log.wandb_run_name=r"]
SFT_DATA = str(REPO / "data/selfinstruct_seed_tasks.jsonl")
# configs/tiny/ppo.yaml starts from an SFT result; these runs start from the random tiny model
TINY = ["policy.name_or_path=tiny-llama"]
LORA = [*TINY, "adapter.kind=lora", "adapter.r=8"]

STAGES = {
    "sft": (SFTConfig, sft, "configs/tiny/sft_lora.yaml", [
        [*COMMON, "log.generation_freq=3", "log.generation_prompts=[Hi]", "log.generation_max_new_tokens=4",
         f"data.golden={SFT_DATA}", "train.global_batch_size=8"],
        [*EPOCHS, "data.packing=false", "data.group_by_length=false"],
        [*WANDB, "train.max_steps=1", "adapter.kind=none", "train.schedule=constant"],
    ]),
    "rm": (RMConfig, rm, "configs/tiny/rm.yaml", [
        [*COMMON, "train.global_batch_size=8"],
        [*EPOCHS, *WANDB],
    ]),
    "dpo": (DPOConfig, dpo, "configs/tiny/dpo.yaml", [
        [*COMMON, "log.generation_freq=3", "log.generation_prompts=[Hi]", "log.generation_max_new_tokens=4",
         "dpo.loss=conservative", "dpo.label_smoothing=0.1"],
        [*EPOCHS, *WANDB, "dpo.precompute_ref=true", "adapter.kind=none"],
    ]),
    "ppo": (PPOConfig, ppo, "configs/tiny/ppo.yaml", [
        [*LORA, "train.max_steps=3", "train.warmup_steps=1", "train.min_lr=1e-5", "train.save_every=2",
         "train.keep_last=1", "ppo.kl_target=1.0", "ppo.kl_horizon=100", "ppo.ptx_coef=0.1", f"ppo.ptx_data={SFT_DATA}",
         "data.max_seq_len=64", "data.packing=false", "data.group_by_length=false", "train.loss_chunk_size=16",
         "rollout.prompts_per_step=4", "ppo.mini_batch_size=2"],
        [*TINY, *EPOCHS, *WANDB, "ppo.value_name_or_path=tiny-llama", "rollout.prompts_per_step=4",
         "ppo.mini_batch_size=2", "rollout.stop_strings=['<|im_end|>']"],
        [*LORA, "train.max_steps=1", "rollout.stop_token_ids=[2]", "rollout.prompts_per_step=4", "ppo.mini_batch_size=2"],
    ]),
    "grpo": (GRPOConfig, grpo, "configs/tiny/grpo.yaml", [
        [*LORA, "train.max_steps=3", "train.warmup_steps=1", "train.min_lr=1e-5", "train.save_every=2",
         "train.keep_last=1", "grpo.kl_coef=0.1", "grpo.kl_mode=loss", "grpo.kl_estimator=k2", "grpo.clip_high=0.3",
         "grpo.loss_aggregation=seq_mean", "grpo.resample_rounds=1", "grpo.epochs=2", "grpo.mini_batch_size=8",
         "grpo.std_eps=1e-3", "rollout.stop_strings=['<|im_end|>']", "reward.function=null",
         "reward.functions=[{function: 'instructkit.rewards:brevity', weight: 0.5, kwargs: {target_words: 3}}]"],
        [*TINY, *EPOCHS, *WANDB, "grpo.advantage=reinforce_pp", "grpo.gamma=0.9", "grpo.kl_coef=0.05",
         "grpo.kl_mode=reward", "rollout.stop_token_ids=[2]"],
    ]),
    "pretrain": (PretrainConfig, pretrain, "configs/pretrain_tiny.yaml", [
        [*COMMON, "train.max_steps=3"],
        [*EPOCHS, *WANDB, "tokenizer.train=true", "tokenizer.vocab_size=320", "data.seq_len=32",
         "model.shape=null", "model.hidden_size=32", "model.intermediate_size=64", "model.num_layers=1",
         "model.num_heads=2", "model.num_kv_heads=1"],
    ]),
}

# Read before the schema is built: the preset's values are merged into the YAML (instructkit.presets).
LOAD_TIME = {"preset"}
# QLoRA needs a CUDA GPU (bitsandbytes); on CPU the run stops before the quantization settings
# are read. Rejected unless adapter.kind=qlora (checked below).
GPU_ONLY = {"adapter.quant_type", "adapter.double_quant"}


@pytest.fixture
def fake_wandb(monkeypatch):
    import importlib.machinery

    run = types.SimpleNamespace(log=lambda *a, **k: None, finish=lambda *a, **k: None)
    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = lambda **k: run
    monkeypatch.setitem(sys.modules, "wandb", module)


def traced_run(cls, stage, yml, overrides, out) -> set[str]:
    cfg = load_config(cls, REPO / yml, [f"output_dir={out}", *QUIET, *overrides])
    reads = Reads()
    trace(cfg, reads)
    reads.on = True
    cfg.check(1)  # the checks' reads count: a derived value (grad_accum) is where a key acts
    stage.run(cfg)
    return reads.keys


@pytest.mark.parametrize("name", list(STAGES))
def test_every_key_is_read_or_rejected(name, tmp_path, monkeypatch, fake_wandb):
    cls, stage, yml, variants = STAGES[name]
    monkeypatch.chdir(REPO)  # the shipped configs name data/ relative to the repository
    read: set[str] = set()
    for i, overrides in enumerate(variants):
        read |= traced_run(cls, stage, yml, overrides, tmp_path / f"v{i}")
    base = load_config(cls, REPO / yml, [f"output_dir={tmp_path}/x", *QUIET])
    rejected = set(base.not_applicable())
    distributed = {k for k in leaves(cls) if k.startswith("distributed.")}  # warned about, below
    missing = set(leaves(cls)) - read - rejected - distributed - LOAD_TIME - GPU_ONLY
    assert not missing, f"{name}: keys neither read by a run nor rejected: {sorted(missing)}"


def other_value(cls, key: str, cfg):
    """A valid value of ``key`` other than the default (the default itself is accepted: a
    resolved config.yaml names every key)."""
    import dataclasses
    import typing

    from instructkit.config import dotted_value

    *sections, name = key.split(".")
    for s in sections:
        cls = typing.get_type_hints(cls)[s]
    tp, value = typing.get_type_hints(cls)[name], dotted_value(cfg, key)
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is typing.Literal:
        return next(a for a in args if a != value)
    choices = [c for a in args if typing.get_origin(a) is typing.Literal for c in typing.get_args(a)]
    if choices:  # an optional choice: Literal[...] | None
        return next(c for c in choices if c != value)
    if isinstance(value, bool):
        return not value
    if isinstance(value, float):
        return value / 2 if value else 1e-6
    if isinstance(value, int):
        return value + 1
    if value is None and int in args:
        return 16
    if list[int] in args:
        return [1]
    if typing.get_origin(tp) is list or any(typing.get_origin(a) is list for a in args):
        return ["x"]
    return "x"


@pytest.mark.parametrize("name", list(STAGES))
def test_a_key_that_would_do_nothing_is_rejected_with_the_reason(name, tmp_path, monkeypatch):
    cls, _, yml, _ = STAGES[name]
    monkeypatch.chdir(REPO)
    base = load_config(cls, REPO / yml, [f"output_dir={tmp_path}", *QUIET])
    unread = base.not_applicable()
    assert unread
    for key, reason in unread.items():
        text = yaml.safe_dump(other_value(cls, key, base), default_flow_style=True).strip().removesuffix("...").strip()
        with pytest.raises(ConfigError) as e:
            load_config(cls, REPO / yml, [f"output_dir={tmp_path}", *QUIET, f"{key}={text}"])
        msg = str(e.value)
        assert key in msg and f"the {name} stage" in msg and reason in msg, msg


def test_rejection_names_the_file_and_line(tmp_path):
    p = tmp_path / "rm.yaml"
    p.write_text(f"data:\n  train: {SFT_DATA}\n  packing: true\ntrain:\n  max_steps: 1\n")
    with pytest.raises(ConfigError, match=r"rm.yaml, line 3, key data.packing: does nothing in this stage "
                                          r"\(a micro-batch holds whole groups of responses"):
        load_config(RMConfig, p)


@pytest.mark.parametrize("cls", [RMConfig, DPOConfig])
def test_preference_stages_have_only_the_data_keys_they_read(tmp_path, cls):
    """RM and DPO no longer inherit SFT's schema: SFT-only data keys are not fields; an older
    run's config.yaml that lists them at the value these stages use anyway still loads."""
    for key in ("packing", "group_by_length", "train_on_prompt", "golden"):
        assert not hasattr(cls().data, key)
    p = tmp_path / "old.yaml"
    p.write_text(f"data:\n  train: {SFT_DATA}\n  packing: false\n  group_by_length: true\n"
                 "  train_on_prompt: false\n  golden: null\ntrain:\n  max_steps: 1\n")
    assert load_config(cls, p).data.train == str(SFT_DATA)
    p.write_text(f"data:\n  train: {SFT_DATA}\n  golden: g.jsonl\n")
    with pytest.raises(ConfigError, match="key data.golden: does nothing in this stage .only SFT evaluates"):
        load_config(cls, p)


def test_pipeline_sections_are_checked_too(tmp_path):
    from instructkit.pipeline import load_pipeline_config

    with pytest.raises(ConfigError, match="ppo.train.micro_batch_size: does nothing in the ppo stage"):
        load_pipeline_config(REPO / "configs/tiny/pipeline.yaml", ["ppo.train.micro_batch_size=2"])
    # a section of a stage that is not run is not checked
    load_pipeline_config(REPO / "configs/tiny/pipeline.yaml", ["stages=[sft]", "ppo.train.micro_batch_size=2"])


@pytest.mark.parametrize("key", ["distributed.zero_stage=3", "distributed.cpu_offload=true",
                                 "distributed.strategy=fsdp", "distributed.reshard_after_forward=false",
                                 "distributed.backend=gloo"])
def test_distributed_settings_in_one_process_warn_what_to_do(key, caplog):
    with caplog.at_level(logging.WARNING, logger="instructkit.config"):
        load_config(SFTConfig, None, [f"data.train={SFT_DATA}", "train.max_steps=1", key], world_size=1)
    assert key.split("=")[0] in caplog.text and "only under torchrun" in caplog.text
    assert "gradient_checkpointing" in caplog.text and "qlora" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="instructkit.config"):
        load_config(SFTConfig, None, [f"data.train={SFT_DATA}", "train.max_steps=1", key], world_size=2)
    assert not caplog.text


def test_ppo_honours_the_optimizer_setting(tmp_path, monkeypatch):
    """train.optimizer reached PPO's optimizer (it ran plain AdamW whatever was set)."""
    from instructkit.engine import optim

    seen = []
    real = optim.optimizer_of
    monkeypatch.setattr(optim, "optimizer_of", lambda groups, t, device: seen.append(t.optimizer) or real(groups, t, device))
    monkeypatch.chdir(REPO)
    cfg = load_config(PPOConfig, REPO / "configs/tiny/ppo.yaml", [f"output_dir={tmp_path}", *QUIET, *LORA,
                                                                  "train.optimizer=adamw_8bit", "train.max_steps=1"])
    from instructkit.errors import UserError

    with pytest.raises(UserError, match="adamw_8bit needs a CUDA GPU"):
        ppo.run(cfg)
    assert seen == ["adamw_8bit"]


def test_dpo_logs_generations_every_generation_freq(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    cfg = load_config(DPOConfig, REPO / "configs/tiny/dpo.yaml", [
        f"output_dir={tmp_path}", *QUIET, "train.max_steps=4", "log.generation_freq=2",
        "log.generation_prompts=[Hello there]", "log.generation_max_new_tokens=3"])
    dpo.run(cfg)
    rows = [json.loads(l) for l in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and rows[0]["prompt"] == "Hello there"


def test_the_trace_sees_real_reads_only():
    """The walk can fail: a key read only by asdict (config.yaml) or replace is not counted,
    a read through a replace() copy is."""
    import dataclasses

    from instructkit.config import to_dict

    cfg = SFTConfig()
    reads = Reads()
    trace(cfg, reads)
    reads.on = True
    to_dict(cfg)
    copy = dataclasses.replace(cfg.train, lr=1.0)
    assert reads.keys == set()
    assert copy.min_lr == 0.0 and cfg.data.packing
    assert reads.keys == {"train.min_lr", "data.packing"}


def test_eval_rejects_settings_of_tasks_it_does_not_run(tmp_path):
    from instructkit.evaluate.config import EvalConfig

    base = ["model=tiny-llama", f"output_dir={tmp_path}", f"samples.prompts={SFT_DATA}"]
    for key, why in [("reward.data=x.jsonl", "the reward_accuracy task is not in tasks"),
                     ("judge.model=m", "neither judge nor pairwise is in tasks"),
                     ("pairwise.model_b=tiny-llama", "the pairwise task is not in tasks"),
                     ("perplexity.max_seq_len=64", "the perplexity task is not in tasks")]:
        with pytest.raises(ConfigError, match=f"{key.split('=')[0]}: does nothing in the eval stage .{why}"):
            load_config(EvalConfig, None, [*base, "tasks=[samples]", key])
    with pytest.raises(ConfigError, match="judge.base_url: does nothing in the eval stage .judge.backend is hf"):
        load_config(EvalConfig, None, [*base, "tasks=[judge]", "judge.backend=hf", "judge.hf_model=tiny-llama",
                                       "judge.base_url=http://x/v1"])
    with pytest.raises(ConfigError, match="judge.hf_model: does nothing in the eval stage .judge.backend is openai"):
        load_config(EvalConfig, None, [*base, "tasks=[judge]", "judge.model=m", "judge.hf_model=tiny-llama"])
    load_config(EvalConfig, None, [*base, "tasks=[samples,judge]", "judge.model=m", "judge.timeout_s=5"])


def test_every_eval_key_is_read_or_rejected(tmp_path, monkeypatch):
    """The same walk for `instructkit eval`: every task in one run against a local judge server,
    then the local HF judge with pairwise against a model B."""
    from instructkit.evaluate.config import EvalConfig
    from instructkit.evaluate.run import run
    from instructkit.models import build_tiny_model, save_final, tiny_tokenizer
    from instructkit.config import ModelConfig
    from test_eval import JudgeServer

    lm = save_final(build_tiny_model("tiny-llama", seed=1), tiny_tokenizer(), tmp_path / "sft" / "final",
                    ModelConfig(name_or_path="tiny-llama"))
    reward = rm.run(load_config(RMConfig, REPO / "configs/tiny/rm.yaml", [
        f"output_dir={tmp_path / 'rm'}", "train.max_steps=1", "data.max_examples=16", *QUIET])).final_dir
    golden, answers_b = tmp_path / "golden.jsonl", tmp_path / "b.jsonl"
    golden.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Name a colour.", "Say hello.")))
    answers_b.write_text("".join(json.dumps({"prompt": p, "response": "B"}) + "\n" for p in ("Name a colour.", "Say hello.")))
    monkeypatch.setenv("WALK_KEY", "k")
    monkeypatch.chdir(REPO)
    server = JudgeServer()
    common = [f"model={lm}", "device=cpu", "progress=false", "precision=fp32", f"samples.prompts={golden}",
              "samples.max_prompts=2", "samples.max_new_tokens=4", "samples.temperature=0.5", "samples.top_p=0.9",
              "samples.top_k=5", "samples.seed=1", "samples.max_prompt_len=64", "samples.system_prompt=Be brief.",
              "samples.batch_size=2", "samples.split=train", "samples.field=prompt", "samples.template=chat"]
    variants = [
        [*common, "tasks=[perplexity,reward_accuracy,samples,judge,pairwise]", f"output_dir={tmp_path / 'a'}",
         f"perplexity.data={SFT_DATA}", "perplexity.max_examples=4", "perplexity.batch_size=2",
         "perplexity.max_seq_len=64", "perplexity.train_on_prompt=true", "perplexity.system_prompt=s",
         f"reward.model={reward}", f"reward.data={REPO / 'data/hh_rlhf_harmless_sample.jsonl'}",
         "reward.max_examples=4", "reward.batch_size=2", "reward.max_seq_len=64", "reward.system_prompt=s",
         f"judge.base_url={server.url}", "judge.model=j", "judge.api_key_env=WALK_KEY", "judge.timeout_s=10",
         "judge.retries=0", "judge.backoff_s=0.01", "judge.concurrency=2", "judge.max_new_tokens=8",
         f"pairwise.responses_b={answers_b}"],
        [*common, "tasks=[judge,pairwise]", f"output_dir={tmp_path / 'b'}", "judge.backend=hf",
         "judge.hf_model=tiny-llama", "judge.batch_size=2", "judge.device=cpu", "judge.max_new_tokens=4",
         "pairwise.model_b=tiny-llama"],
    ]
    read: set[str] = set()
    try:
        for overrides in variants:
            cfg = load_config(EvalConfig, None, overrides)
            reads = Reads()
            trace(cfg, reads)
            reads.on = True
            cfg.check()
            run(cfg)
            read |= reads.keys
    finally:
        server.close()
    rejected = set(load_config(EvalConfig, None, [f"model={lm}", f"samples.prompts={SFT_DATA}",
                                                  "tasks=[samples]"]).not_applicable())
    rejected |= set(load_config(EvalConfig, None, [f"model={lm}", f"samples.prompts={SFT_DATA}", "tasks=[judge]",
                                                   "judge.model=j"]).not_applicable())
    # (judge.rubric_path, judge.pairwise_path and judge.responses are read here unset; test_eval.py
    # and test_evaluate_judge.py run them set)
    missing = set(leaves(EvalConfig)) - read - rejected
    assert not missing, f"eval: keys neither read by a run nor rejected: {sorted(missing)}"

"""Typed run configuration: dataclasses are the schema.

A run config is one YAML file plus ``dotted.key=value`` overrides from the command line.
Values are merged in this order (later wins): dataclass defaults, the model-size ``preset``,
the YAML file, the overrides. Every key is checked against the dataclass fields: an unknown
key or a value of the wrong type is a :class:`ConfigError` that names the file, the line,
the key and the valid choices.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from instructkit.atomic import write_atomic
from instructkit.errors import ConfigError
from instructkit.redact import redact
from instructkit.shapes import llama_shape

Precision = Literal["fp32", "bf16", "bf16-mixed"]
AttnImpl = Literal["eager", "sdpa", "flash_attention_2", "flex_attention"]


# --------------------------------------------------------------------------- sections


@dataclass
class ModelConfig:
    # Hub id, local Hugging Face folder, a local .gguf file, or a tiny random preset
    # ("tiny-llama", see instructkit.models.tiny).
    name_or_path: str = "tiny-llama"
    revision: str | None = None
    tokenizer: str | None = None  # defaults to name_or_path
    trust_remote_code: bool = False
    precision: Precision = "fp32"
    attn_implementation: AttnImpl = "sdpa"
    # Rule out SDPA kernels that misbehave on some stacks (cuDNN attention, flash).
    disable_cudnn_sdp: bool = False
    disable_flash_sdp: bool = False
    compile: bool = False
    gradient_checkpointing: bool = False
    freeze_layers: int = 0  # freeze the embeddings and the first N decoder layers
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    chat_template: str | None = None  # a Jinja template string or a path to one


@dataclass
class AdapterConfig:
    kind: Literal["none", "lora", "dora", "qlora"] = "none"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # None: every linear layer of the decoder, detected per architecture.
    target_modules: list[str] | None = None
    # QLoRA only
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True


@dataclass
class DataConfig:
    train: str = ""  # a file (.json/.jsonl/.jsonl.gz/.parquet/.csv) or a datasets name
    # SFT formats: alpaca, dolly, self_instruct, messages, sharegpt, oasst, text;
    # preference formats (rm, dpo): pairs, hh, ranked, oasst; PPO also reads "prompts"
    # (a `prompt` field) or takes the prompt part of any of the others.
    format: Literal[
        "auto", "alpaca", "dolly", "self_instruct", "messages", "sharegpt", "oasst", "text",
        "pairs", "hh", "ranked", "prompts",
    ] = "auto"
    split: str = "train"  # split of a datasets name
    fields: dict[str, str] = field(default_factory=dict)  # our name -> the file's name
    template: Literal["auto", "chat", "alpaca"] = "auto"
    system_prompt: str | None = None
    max_seq_len: int = 1024
    train_on_prompt: bool = False
    validation: str | None = None  # a separate file; else val_fraction of train
    val_fraction: float = 0.05
    val_max: int = 500
    golden: str | None = None  # an extra set, evaluated and reported on its own
    max_examples: int | None = None
    packing: bool = True
    group_by_length: bool = True  # only when packing is off


@dataclass
class PreferenceDataConfig:
    """The data section of the preference stages (rm, dpo): what they read, no more."""
    train: str = ""  # a file or a datasets name; formats pairs, hh, ranked, oasst
    format: Literal["auto", "pairs", "hh", "ranked", "oasst"] = "auto"
    split: str = "train"
    fields: dict[str, str] = field(default_factory=dict)
    template: Literal["auto", "chat", "alpaca"] = "auto"
    system_prompt: str | None = None
    max_seq_len: int = 1024
    validation: str | None = None
    val_fraction: float = 0.05
    val_max: int = 500
    max_examples: int | None = None

    # SFT's data keys that these stages do not have, each with the value that is what they do
    # anyway (so an older run's config.yaml, which listed them, loads again) and why.
    NOT_READ: typing.ClassVar[dict[str, tuple[object, str]]] = {
        "packing": (False, "a micro-batch holds whole groups of responses to one prompt, one response per row"),
        "group_by_length": (True, "a micro-batch holds whole groups of responses to one prompt, one response per row"),
        "train_on_prompt": (False, "the loss compares responses; the prompt is never trained"),
        "golden": (None, "only SFT evaluates a golden set; use `instructkit eval` on the result"),
    }


@dataclass
class TrainConfig:
    max_steps: int | None = None
    epochs: float | None = None
    micro_batch_size: int = 4
    grad_accum: int = 1
    # Optional: the effective batch (micro_batch_size x grad_accum x world size); when
    # given, grad_accum is derived from it.
    global_batch_size: int | None = None
    lr: float = 2e-4
    min_lr: float = 0.0
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    warmup_fraction: float | None = None
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    max_grad_norm: float | None = 1.0
    # LM head + loss on target positions only, in chunks of this many tokens whose logits are
    # recomputed in backward (saves the [tokens, vocab] logits); 0: plain full-logits forward.
    loss_chunk_size: int = 4096
    seed: int = 42
    max_nonfinite_steps: int = 5  # stop with a diagnosis after this many in a row
    eval_every: int = 0  # 0: only at the end
    eval_at_start: bool = True  # a step-0 evaluation, the baseline the curve is read against
    eval_max_batches: int | None = None
    early_stopping_patience: int | None = None  # evaluations without improvement
    save_every: int = 0  # 0: only the final model
    keep_last: int = 2


@dataclass
class LogConfig:
    every: int = 1
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "instructkit"
    wandb_run_name: str | None = None
    progress: bool = True
    generation_freq: int = 0  # sample generations to TensorBoard every N steps
    generation_prompts: list[str] = field(
        default_factory=lambda: ["Give three tips for staying healthy."]
    )
    generation_max_new_tokens: int = 64


@dataclass
class DistributedConfig:
    """Used when launched by torchrun on several processes; ignored in one process."""

    strategy: Literal["auto", "fsdp", "ddp"] = "auto"  # auto: fsdp (or what zero_stage implies)
    # DeepSpeed-style: 0 -> ddp, 2 -> fsdp keeping parameters gathered after forward,
    # 3 -> fsdp fully sharded; 1 has no FSDP2 counterpart and is rejected with the reason.
    zero_stage: int | None = None
    reshard_after_forward: bool = True  # FSDP: free gathered parameters after each layer's forward
    cpu_offload: bool = False  # FSDP: parameters, gradients and optimizer state in CPU memory
    backend: Literal["auto", "nccl", "gloo"] = "auto"  # auto: nccl with CUDA, else gloo


@dataclass(frozen=True)
class Plan:
    """What ``wrap`` does: ``strategy`` fsdp or ddp; FSDP's resharding and offload."""

    strategy: str
    reshard_after_forward: bool = True
    cpu_offload: bool = False


ZERO_STAGE_HELP = (
    "DeepSpeed ZeRO stages map onto PyTorch as: 0 = DDP (replicas, gradients all-reduced); "
    "2 = FSDP2 keeping parameters gathered between forward and backward "
    "(reshard_after_forward=false: gradients and optimizer state sharded); "
    "3 = FSDP2 fully sharded (parameters too). ZeRO-1 (optimizer state only) has no FSDP2 "
    "counterpart; use zero_stage=2, which shards the gradients as well and needs no more memory"
)


def resolve_plan(dcfg) -> Plan:
    """``distributed`` config section -> Plan; contradictions are ConfigErrors."""
    strategy, zs = dcfg.strategy, dcfg.zero_stage
    reshard = dcfg.reshard_after_forward
    if zs is not None:
        if zs not in (0, 2, 3):
            raise ConfigError(f"distributed.zero_stage={zs}: {ZERO_STAGE_HELP}")
        implied = "ddp" if zs == 0 else "fsdp"
        if strategy not in ("auto", implied):
            raise ConfigError(
                f"distributed.zero_stage={zs} means strategy={implied}, but distributed.strategy="
                f"{strategy}: drop one of the two. {ZERO_STAGE_HELP}"
            )
        strategy = implied
        if zs == 2:
            reshard = False
    if strategy == "auto":
        strategy = "fsdp"
    if strategy == "ddp" and dcfg.cpu_offload:
        raise ConfigError("distributed.cpu_offload needs strategy=fsdp (DDP keeps whole replicas on each GPU)")
    return Plan(strategy=strategy, reshard_after_forward=reshard, cpu_offload=dcfg.cpu_offload)


def check_distributed(d: DistributedConfig) -> None:
    resolve_plan(d)


def env_world_size() -> int:
    """The world size torchrun announced (before the process group exists)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


NUM_PADDING_AT_BEGINNING_MESSAGE = (
    "num_padding_at_beginning is not needed and not accepted: DeepSpeed-Chat's reward model "
    "found the end of each sequence by searching for pad token ids and skipped that many pad "
    "tokens at the start (1 for OPT, whose tokenizer starts every sequence with a token equal "
    "to its pad id). instructkit reads the score at the last real token taken from the "
    "attention mask, which is right for right padding, left padding, leading pad-like tokens "
    "and pad == eos alike, so there is nothing to offset. Remove the setting."
)


# --------------------------------------------------------------------------- settings a stage does not read
#
# A setting is honoured or rejected, never silently ignored. Each stage config's
# ``not_applicable()`` maps the dotted keys that would do nothing in this run to the reason;
# ``load_config`` rejects any of them that the user set (tests/stages/test_settings.py walks
# every stage's schema and checks that each key is either read by a run or listed here).


def adapter_not_applicable(a: AdapterConfig) -> dict[str, str]:
    out = {}
    if a.kind != "qlora":
        out.update(dict.fromkeys(("adapter.quant_type", "adapter.double_quant"),
                                 f"only adapter.kind=qlora quantizes the base (adapter.kind is {a.kind})"))
    if a.kind == "none":
        out.update(dict.fromkeys(("adapter.r", "adapter.alpha", "adapter.dropout", "adapter.target_modules"),
                                 "adapter.kind is none (full fine-tuning): there is no adapter"))
    return out


def log_not_applicable(l: LogConfig) -> dict[str, str]:
    out = {}
    if not l.wandb:
        out.update(dict.fromkeys(("log.wandb_project", "log.wandb_run_name"), "log.wandb is false"))
    if not l.generation_freq:
        out.update(dict.fromkeys(("log.generation_prompts", "log.generation_max_new_tokens"),
                                 "log.generation_freq is 0 (no sample generations)"))
    return out


def train_not_applicable(t: TrainConfig) -> dict[str, str]:
    out = {}
    if t.schedule == "constant":
        out["train.min_lr"] = "train.schedule is constant"
    if not t.eval_every:
        out["train.early_stopping_patience"] = "train.eval_every is 0: the only evaluation is at the end"
    if not t.save_every and t.early_stopping_patience is None:
        out["train.keep_last"] = "train.save_every is 0: no checkpoints are written, only the final model"
    return out


def data_not_applicable(d: DataConfig | PreferenceDataConfig) -> dict[str, str]:
    out = {}
    if getattr(d, "packing", False):  # (preference rows are never packed)
        out["data.group_by_length"] = "it orders unpacked rows; data.packing is true"
    if d.validation:
        out["data.val_fraction"] = "data.validation names the validation set"
    return out


def check_fine_tuning(cfg, world_size: int) -> None:
    """The checks SFT, RM and DPO share (their model, adapter, data, train and distributed)."""
    check_train(cfg.train, world_size)
    check_distributed(cfg.distributed)
    if not cfg.data.train:
        raise ConfigError("data.train is empty: set it to a data file or a datasets name")
    if cfg.data.max_seq_len < 8:
        raise ConfigError(f"data.max_seq_len={cfg.data.max_seq_len} is too small (>= 8)")
    if not 0.0 <= cfg.data.val_fraction < 1.0:
        raise ConfigError("data.val_fraction must be in [0, 1)")
    if cfg.model.freeze_layers < 0:
        raise ConfigError("model.freeze_layers must be >= 0")
    if cfg.adapter.kind != "none" and cfg.adapter.r <= 0:
        raise ConfigError("adapter.r must be > 0")


def fine_tuning_not_applicable(cfg) -> dict[str, str]:
    return {**adapter_not_applicable(cfg.adapter), **log_not_applicable(cfg.log),
            **train_not_applicable(cfg.train), **data_not_applicable(cfg.data)}


@dataclass
class SFTConfig:
    output_dir: str = "runs/sft"
    preset: str | None = None  # model-size preset, see instructkit.presets
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def check(self, world_size: int = 1) -> None:
        """Cross-field checks; raises ConfigError."""
        check_fine_tuning(self, world_size)

    STAGE: typing.ClassVar[str] = "sft"

    def not_applicable(self) -> dict[str, str]:
        """Keys that would do nothing in this run, and why (see ``load_config``)."""
        return fine_tuning_not_applicable(self)


@dataclass
class RewardSection:
    margin: float = 0.0  # required gap r_better - r_worse, added inside the sigmoid
    center_coef: float = 0.0  # weight of the reward-centering term mean((r_b + r_w)^2)
    stats_max_groups: int = 512  # training groups scored at the end for the stored mean/std
    # Every dropout (LoRA's included) set to 0, as TRL does: the loss compares passes.
    disable_dropout: bool = True
    # Accepted for DeepSpeed-Chat scripts; only 0 (or unset) is valid, see RMConfig.check.
    num_padding_at_beginning: int | None = None


@dataclass
class RMConfig:
    output_dir: str = "runs/rm"
    preset: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    rm: RewardSection = field(default_factory=RewardSection)

    def check(self, world_size: int = 1) -> None:
        check_fine_tuning(self, world_size)
        if self.rm.num_padding_at_beginning not in (None, 0):
            raise ConfigError(
                f"rm.num_padding_at_beginning={self.rm.num_padding_at_beginning}: "
                + NUM_PADDING_AT_BEGINNING_MESSAGE
            )

    STAGE: typing.ClassVar[str] = "rm"

    def not_applicable(self) -> dict[str, str]:
        return {**fine_tuning_not_applicable(self),
                "train.loss_chunk_size": "a reward model has a score head, not an LM head",
                **dict.fromkeys(("log.generation_freq", "log.generation_prompts", "log.generation_max_new_tokens"),
                                "a reward model does not generate")}


@dataclass
class DPOSection:
    loss: Literal["sigmoid", "ipo", "hinge", "conservative"] = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0  # conservative DPO only
    # Reference log-probs computed once before training; the reference model is then freed.
    precompute_ref: bool = False
    # Reference model; None: the starting policy (with LoRA: the base with adapters disabled).
    ref_name_or_path: str | None = None
    # Every dropout (LoRA's included) set to 0, as TRL does: with dropout the policy's
    # log-probs of the same pair differ from pass to pass and the loss is not at log 2 at start.
    disable_dropout: bool = True


@dataclass
class DPOConfig:
    output_dir: str = "runs/dpo"
    preset: str | None = None
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: PreferenceDataConfig = field(default_factory=PreferenceDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    dpo: DPOSection = field(default_factory=DPOSection)

    def check(self, world_size: int = 1) -> None:
        check_fine_tuning(self, world_size)
        if self.dpo.beta <= 0:
            raise ConfigError("dpo.beta must be > 0")
        if not 0.0 <= self.dpo.label_smoothing < 0.5:
            raise ConfigError("dpo.label_smoothing must be in [0, 0.5)")
        if self.dpo.label_smoothing and self.dpo.loss != "conservative":
            raise ConfigError("dpo.label_smoothing only applies to dpo.loss=conservative")

    STAGE: typing.ClassVar[str] = "dpo"

    def not_applicable(self) -> dict[str, str]:
        out = {**fine_tuning_not_applicable(self),
               "train.loss_chunk_size": "DPO sums each response's log-probs from the model's full logits"}
        if self.dpo.loss != "conservative":
            out["dpo.label_smoothing"] = "only dpo.loss=conservative smooths labels"
        return out


@dataclass
class RewardSource:
    # A reward model folder (the final/ of `instructkit rm`), or a Python function
    # "module:function" called as fn(prompts, responses) -> list[float]; exactly one.
    name_or_path: str | None = None
    function: str | None = None
    normalize: Literal["stored", "running", "none"] = "stored"  # stored: the RM's train mean/std
    clip: float | None = 5.0  # after normalisation
    no_eos_penalty: float = 0.0  # added to the score of a response that never reached EOS (<= 0)

    def normalization(self) -> str:
        """``normalize`` as it applies: a function has no stored statistics, so "stored" is "none"."""
        return "none" if self.function and self.normalize == "stored" else self.normalize


@dataclass
class RolloutSection:
    prompts_per_step: int = 8
    max_prompt_len: int = 256  # longer prompts keep their end
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    micro_batch_size: int = 8  # for the log-prob, value and reward passes
    # A response ends at its first stop token. Default: the model's generation_config EOS ids,
    # the tokenizer's EOS and the token the chat template puts after an answer; either of these
    # replaces that set (token ids, or strings that are one token each).
    stop_token_ids: list[int] | None = None
    stop_strings: list[str] | None = None


@dataclass
class PPOSection:
    epochs: int = 2  # passes over each rollout
    mini_batch_size: int = 4
    clip: float = 0.2
    value_clip: float = 0.2
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05
    # k1 (log pi - log ref) as the per-token penalty follows the KL's exact gradient; k3's value
    # is unbiased with lower variance, but as a reward its gradient is biased (a weaker pull).
    kl_estimator: Literal["k1", "k3"] = "k1"
    kl_target: float | None = None  # set for the adaptive controller (Ziegler et al.)
    kl_horizon: int = 10000
    whiten_advantages: bool = True
    value_lr: float | None = None  # default: train.lr
    value_warmup_steps: int = 0  # PPO steps that update only the value model
    # Value model for full fine-tuning; default: the reward model. With LoRA the value model
    # is a second adapter on the policy's base plus a head initialised from the reward model.
    value_name_or_path: str | None = None
    offload_frozen: bool = False  # full fine-tuning: frozen models to CPU while training
    ptx_coef: float = 0.0  # InstructGPT's pretraining-loss mix
    ptx_data: str | None = None  # an SFT data file for it (any SFT format)


@dataclass
class PPOConfig:
    output_dir: str = "runs/ppo"
    preset: str | None = None
    policy: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    reward: RewardSource = field(default_factory=RewardSource)
    data: DataConfig = field(default_factory=DataConfig)  # the prompts
    rollout: RolloutSection = field(default_factory=RolloutSection)
    ppo: PPOSection = field(default_factory=PPOSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-5, max_grad_norm=1.0))
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def check(self, world_size: int = 1) -> None:
        check_train(self.train, world_size)
        check_distributed(self.distributed)
        if self.distributed.strategy == "ddp" or self.distributed.zero_stage == 0:
            raise ConfigError(
                "distributed.strategy=ddp does not fit PPO: each update runs the policy and the value "
                "passes through one model before one backward, and DDP allows one forward per backward; "
                "use distributed.strategy=fsdp (the default)"
            )
        if not self.data.train:
            raise ConfigError("data.train is empty: set it to a file of prompts (or preference pairs)")
        if (self.reward.name_or_path is None) == (self.reward.function is None):
            raise ConfigError(
                "set exactly one of reward.name_or_path (a reward model) and reward.function "
                "(module:function)"
            )
        for key, value in (("rollout.prompts_per_step", self.rollout.prompts_per_step),
                           ("rollout.micro_batch_size", self.rollout.micro_batch_size),
                           ("rollout.max_new_tokens", self.rollout.max_new_tokens),
                           ("rollout.max_prompt_len", self.rollout.max_prompt_len),
                           ("ppo.mini_batch_size", self.ppo.mini_batch_size), ("ppo.epochs", self.ppo.epochs)):
            if value <= 0:
                raise ConfigError(f"{key}={value} must be > 0")
        if self.reward.no_eos_penalty > 0:
            raise ConfigError("reward.no_eos_penalty must be <= 0 (it is added to the score)")
        if self.ppo.mini_batch_size > self.rollout.prompts_per_step:
            raise ConfigError(
                f"ppo.mini_batch_size={self.ppo.mini_batch_size} is larger than "
                f"rollout.prompts_per_step={self.rollout.prompts_per_step}"
            )
        if self.rollout.temperature <= 0:
            raise ConfigError("rollout.temperature must be > 0 (PPO needs sampling)")
        if self.ppo.ptx_coef and not self.ppo.ptx_data:
            raise ConfigError("ppo.ptx_coef is set but ppo.ptx_data is not: name an SFT data file")

    STAGE: typing.ClassVar[str] = "ppo"

    def not_applicable(self) -> dict[str, str]:
        out = {**adapter_not_applicable(self.adapter), **log_not_applicable(self.log),
               **train_not_applicable(self.train), **data_not_applicable(self.data)}
        out.update(dict.fromkeys(("data.validation", "data.val_fraction", "data.val_max", "data.golden"),
                                 "PPO reads prompts and has no validation pass; rollout.max_prompt_len cuts them"))
        if not self.ppo.ptx_coef:
            out.update(dict.fromkeys(("data.packing", "data.group_by_length", "data.train_on_prompt",
                                      "data.max_seq_len"),
                                     "it shapes only the pretraining mix (ppo.ptx_data), and ppo.ptx_coef is 0; "
                                     "rollout.max_prompt_len cuts prompts"))
        out.update(dict.fromkeys(("log.generation_freq", "log.generation_prompts", "log.generation_max_new_tokens"),
                                 "PPO writes its rollouts to samples.jsonl every log.every steps"))
        out.update(dict.fromkeys(("train.micro_batch_size", "train.grad_accum", "train.global_batch_size"),
                                 "PPO's batches are rollout.prompts_per_step, ppo.mini_batch_size and "
                                 "rollout.micro_batch_size"))
        out.update(dict.fromkeys(("train.eval_every", "train.eval_at_start", "train.eval_max_batches",
                                  "train.early_stopping_patience"),
                                 "PPO has no validation pass; its metrics are the rollouts' (run `instructkit eval` on the result)"))
        if not self.ppo.ptx_coef:
            out["ppo.ptx_data"] = "ppo.ptx_coef is 0"
            out["train.loss_chunk_size"] = "PPO uses it only for the pretraining mix and ppo.ptx_coef is 0"
        if self.ppo.kl_target is None:
            out["ppo.kl_horizon"] = "the KL coefficient is fixed; set ppo.kl_target for the adaptive controller"
        if self.adapter.kind != "none":
            out["ppo.value_name_or_path"] = ("with an adapter the value model is a second adapter on the policy's "
                                             "base, its head initialised from the reward model")
        return out


@dataclass
class RewardTerm:
    # "module:function" called as fn(prompts, responses, **fields) -> list[float]; ``fields``
    # are the prompt records' other fields (a gsm8k "answer") that the function names.
    function: str = ""
    weight: float = 1.0
    kwargs: dict[str, Any] = field(default_factory=dict)  # fixed keyword arguments


@dataclass
class GroupRewardSection:
    # A reward model folder (the final/ of `instructkit rm`) and / or reward functions; the
    # score is model_weight * model score + the sum of weight * function score.
    name_or_path: str | None = None
    model_weight: float = 1.0
    normalize: Literal["stored", "none"] = "stored"  # the reward model's train mean/std
    function: str | None = None  # one function of weight 1 (shorthand for functions)
    functions: list[RewardTerm] = field(default_factory=list)

    def terms(self) -> list[RewardTerm]:
        """The reward functions as they apply (``function`` is one term of weight 1)."""
        return [RewardTerm(self.function)] if self.function else list(self.functions)


@dataclass
class GRPOSection:
    group_size: int = 4  # G answers per prompt; the group is the baseline
    advantage: Literal["grpo", "dr_grpo", "rloo", "reinforce_pp"] = "grpo"
    std_eps: float = 1e-4  # grpo: (r - mean) / (std + eps)
    gamma: float = 1.0  # reinforce_pp: the discount of its reward-to-go
    epochs: int = 1  # passes over each rollout
    mini_batch_size: int = 16  # answers per optimizer step (the last one of a step may be smaller)
    clip: float = 0.2
    clip_high: float | None = None  # DAPO's asymmetric upper clip; default: clip
    loss_aggregation: Literal["token_mean", "seq_mean", "token_sum"] = "token_mean"
    kl_coef: float = 0.0  # 0: no reference model at all
    kl_mode: Literal["loss", "reward"] = "loss"
    # loss: k3 (GRPO, TRL; the gradient of KL(ref || pi)) or k2 (the gradient of KL(pi || ref));
    # reward: k1 (its expectation is the KL) or k3. Default: k3 in the loss, k1 in the reward.
    kl_estimator: Literal["k1", "k2", "k3"] | None = None
    # DAPO's dynamic sampling: groups whose answers all score the same are replaced by groups of
    # new prompts, up to this many extra rollouts per step; any still left are kept out of the loss.
    resample_rounds: int = 0

    def estimator(self) -> str:
        return self.kl_estimator or ("k3" if self.kl_mode == "loss" else "k1")


@dataclass
class GRPOConfig:
    output_dir: str = "runs/grpo"
    preset: str | None = None
    policy: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    reward: GroupRewardSection = field(default_factory=GroupRewardSection)
    data: DataConfig = field(default_factory=DataConfig)  # the prompts (and fields for rewards)
    rollout: RolloutSection = field(default_factory=lambda: RolloutSection(prompts_per_step=4))
    grpo: GRPOSection = field(default_factory=GRPOSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-6, max_grad_norm=1.0))
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    STAGE: typing.ClassVar[str] = "grpo"

    def check(self, world_size: int = 1) -> None:
        check_train(self.train, world_size)
        check_distributed(self.distributed)
        g, r = self.grpo, self.reward
        if self.distributed.strategy == "ddp" or self.distributed.zero_stage == 0:
            raise ConfigError("distributed.strategy=ddp does not fit GRPO: sampling runs many forwards of the policy "
                              "before one backward; use distributed.strategy=fsdp (the default)")
        if not self.data.train:
            raise ConfigError("data.train is empty: set it to a file of prompts")
        if r.function and r.functions:
            raise ConfigError("set reward.function (one function) or reward.functions (a list), not both")
        if not r.name_or_path and not r.terms():
            raise ConfigError("no reward: set reward.name_or_path (a reward model), reward.function "
                              "(module:function) or reward.functions")
        if any(not t.function for t in r.terms()):
            raise ConfigError("every reward.functions entry needs a function: module:function")
        for key, value in (("rollout.prompts_per_step", self.rollout.prompts_per_step),
                           ("rollout.micro_batch_size", self.rollout.micro_batch_size),
                           ("rollout.max_new_tokens", self.rollout.max_new_tokens),
                           ("rollout.max_prompt_len", self.rollout.max_prompt_len),
                           ("grpo.group_size", g.group_size), ("grpo.mini_batch_size", g.mini_batch_size),
                           ("grpo.epochs", g.epochs)):
            if value <= 0:
                raise ConfigError(f"{key}={value} must be > 0")
        if self.rollout.temperature <= 0:
            raise ConfigError("rollout.temperature must be > 0 (GRPO samples a group of different answers)")
        if g.group_size < 2 and g.advantage != "reinforce_pp":
            raise ConfigError(f"grpo.group_size={g.group_size}: grpo.advantage={g.advantage} compares the answers "
                              "to one prompt and needs at least 2 (reinforce_pp works with 1)")
        if g.mini_batch_size > self.rollout.prompts_per_step * g.group_size:
            raise ConfigError(f"grpo.mini_batch_size={g.mini_batch_size} is larger than the answers of a step "
                              f"(rollout.prompts_per_step x grpo.group_size = "
                              f"{self.rollout.prompts_per_step * g.group_size})")
        if g.kl_coef < 0 or g.clip <= 0 or (g.clip_high is not None and g.clip_high <= 0) or g.std_eps <= 0:
            raise ConfigError("grpo.kl_coef must be >= 0 and grpo.clip, grpo.clip_high, grpo.std_eps > 0")
        if g.resample_rounds < 0:
            raise ConfigError("grpo.resample_rounds must be >= 0")
        if g.kl_coef and g.kl_mode == "loss" and g.estimator() == "k1":
            raise ConfigError("grpo.kl_estimator=k1 with grpo.kl_mode=loss: the gradient of k1 is zero in "
                              "expectation, so it pulls nothing towards the reference; use k3 (GRPO) or k2")
        if g.kl_coef and g.kl_mode == "reward" and g.estimator() == "k2":
            raise ConfigError("grpo.kl_estimator=k2 is a loss term (its gradient is that of the KL); in "
                              "grpo.kl_mode=reward use k1 (or k3)")

    def not_applicable(self) -> dict[str, str]:
        g, r = self.grpo, self.reward
        out = {**adapter_not_applicable(self.adapter), **log_not_applicable(self.log),
               **train_not_applicable(self.train), **data_not_applicable(self.data)}
        out.update(dict.fromkeys(("data.validation", "data.val_fraction", "data.val_max", "data.golden",
                                  "data.packing", "data.group_by_length", "data.train_on_prompt",
                                  "data.max_seq_len"),
                                 "GRPO reads prompts only, with no validation pass; rollout.max_prompt_len cuts them"))
        out.update(dict.fromkeys(("log.generation_freq", "log.generation_prompts", "log.generation_max_new_tokens"),
                                 "GRPO writes its rollouts to samples.jsonl every step"))
        out.update(dict.fromkeys(("train.micro_batch_size", "train.grad_accum", "train.global_batch_size"),
                                 "GRPO's batches are rollout.prompts_per_step x grpo.group_size answers, "
                                 "grpo.mini_batch_size per optimizer step and rollout.micro_batch_size per pass"))
        out.update(dict.fromkeys(("train.eval_every", "train.eval_at_start", "train.eval_max_batches",
                                  "train.early_stopping_patience", "train.loss_chunk_size"),
                                 "GRPO has no validation pass and takes its log-probs from the full logits "
                                 "(run `instructkit eval` on the result)"))
        if not r.name_or_path:
            out.update(dict.fromkeys(("reward.model_weight", "reward.normalize"),
                                     "reward.name_or_path is not set (no reward model)"))
        if not g.kl_coef:
            out.update(dict.fromkeys(("grpo.kl_mode", "grpo.kl_estimator"), "grpo.kl_coef is 0 (no KL term)"))
        if g.advantage != "grpo":
            out["grpo.std_eps"] = f"only grpo.advantage=grpo divides by the group's std (it is {g.advantage})"
        if g.advantage != "reinforce_pp":
            out["grpo.gamma"] = f"only grpo.advantage=reinforce_pp discounts a reward-to-go (it is {g.advantage})"
        return out


def check_train(t: TrainConfig, world_size: int = 1) -> None:
    if (t.max_steps is None) == (t.epochs is None):
        raise ConfigError(
            "set exactly one of train.max_steps and train.epochs "
            f"(got max_steps={t.max_steps}, epochs={t.epochs})"
        )
    if t.max_steps is not None and t.max_steps <= 0:
        raise ConfigError("train.max_steps must be > 0")
    if t.epochs is not None and t.epochs <= 0:
        raise ConfigError("train.epochs must be > 0")
    if t.micro_batch_size <= 0 or t.grad_accum <= 0:
        raise ConfigError("train.micro_batch_size and train.grad_accum must be > 0")
    if t.global_batch_size is not None:
        per_step = t.micro_batch_size * world_size
        if t.global_batch_size % per_step:
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                f"micro_batch_size x world_size = {t.micro_batch_size} x {world_size}"
            )
        derived = t.global_batch_size // per_step
        if t.grad_accum not in (1, derived):
            raise ConfigError(
                f"train.global_batch_size={t.global_batch_size} needs grad_accum={derived} "
                f"(micro_batch_size {t.micro_batch_size} x world size {world_size}), "
                f"but grad_accum={t.grad_accum}: drop one of the two"
            )
    if t.warmup_fraction is not None:
        if t.warmup_steps:
            raise ConfigError("set train.warmup_steps or train.warmup_fraction, not both")
        if not 0.0 <= t.warmup_fraction < 1.0:
            raise ConfigError("train.warmup_fraction must be in [0, 1)")
    import math

    if not (math.isfinite(t.lr) and 0 < t.lr < 1e3):
        raise ConfigError(f"train.lr={t.lr} must be a finite number above 0 (typically 1e-6 to 1e-2)")
    if not (math.isfinite(t.min_lr) and t.min_lr >= 0):
        raise ConfigError(f"train.min_lr={t.min_lr} must be a finite number >= 0")
    if t.save_every < 0 or t.eval_every < 0:
        raise ConfigError("train.save_every and train.eval_every must be >= 0 (0: only at the end)")
    if t.keep_last < 1:
        raise ConfigError("train.keep_last must be >= 1 (the checkpoints kept)")
    if t.min_lr > t.lr:
        raise ConfigError(f"train.min_lr={t.min_lr} is above train.lr={t.lr}")
    if len(t.betas) != 2:
        raise ConfigError("train.betas must be a list of two floats, e.g. [0.9, 0.999]")


def accumulation(t: TrainConfig, world_size: int = 1) -> int:
    """Micro-batches per rank per optimizer step: ``train.grad_accum``, or what
    ``train.global_batch_size`` implies for ``world_size`` ranks (checked by check_train)."""
    if t.global_batch_size is not None:
        return t.global_batch_size // (t.micro_batch_size * world_size)
    return t.grad_accum


def effective_batch_size(t: TrainConfig, world_size: int = 1) -> int:
    return t.micro_batch_size * accumulation(t, world_size) * world_size


# --------------------------------------------------------------------------- loading


def load_config(
    cls: type, path: str | Path | None, overrides: list[str] = (), world_size: int | None = None
):
    """Build a config of dataclass ``cls`` from a YAML file and ``key=value`` overrides.

    ``world_size``: for ``train.global_batch_size``; default: what torchrun announced."""
    if world_size is None:
        world_size = env_world_size()
    data: dict[str, Any] = {}
    lines: dict[str, int] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        data, lines = read_yaml_with_lines(path)
    in_file = copy.deepcopy(data)
    apply_overrides(data, lines, overrides)
    given = dict(data)  # what the user set, before a preset fills in more
    preset = data.get("preset")
    if preset is not None:
        from instructkit.presets import preset_values

        adapter = data.get("adapter") if isinstance(data.get("adapter"), dict) else {}
        full = adapter.get("kind", "none") == "none"
        data = deep_merge(preset_values(str(preset), full_finetune=full), data)
    cfg = from_dict(cls, data, prefix="", source=source, lines=lines)
    check_given(cfg, given, source, lines, world_size, in_file=in_file)  # the clearer error first
    if hasattr(cfg, "check"):
        cfg.check(world_size)
    return cfg


def given_keys(cls: type, data: dict, prefix: str = "") -> list[str]:
    """The dotted schema keys set in ``data`` (a validated mapping; dict-valued fields such as
    ``data.fields`` are one key)."""
    hints = typing.get_type_hints(cls)
    out = []
    for key, value in data.items():
        tp = hints.get(key)
        if dataclasses.is_dataclass(tp) and isinstance(value, dict):
            out += given_keys(tp, value, f"{prefix}{key}.")
        else:
            out.append(prefix + key)
    return out


def dotted_value(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def check_given(cfg, given: dict, source: str, lines: dict[str, int], world_size: int = 1,
                prefix: str = "", in_file: dict | None = None) -> None:
    """Reject a key the user set that this stage would not read (``cfg.not_applicable()``);
    warn about ``distributed.*`` settings in one process, where they do nothing.

    A key from the file that only a command-line override made inapplicable (the file's LoRA
    rank after ``adapter.kind=none``) is a warning, not an error: the file was consistent."""
    import logging

    log = logging.getLogger("instructkit.config")
    keys = given_keys(type(cfg), given)
    unread = cfg.not_applicable() if hasattr(cfg, "not_applicable") else {}
    file_unread = None
    defaults = type(cfg)() if unread else None
    for key in keys:
        # the schema's default changes nothing, so a resolved config.yaml (every key) loads again
        if key not in unread or dotted_value(cfg, key) == dotted_value(defaults, key):
            continue
        if lines.get(prefix + key) != 0 and in_file is not None:
            if file_unread is None:
                file_unread = from_dict(type(cfg), in_file, "", source, {}).not_applicable()
            if key not in file_unread:
                log.warning("%s: does nothing in the %s stage after the command-line overrides (%s)",
                            _where(source, lines, prefix + key), cfg.STAGE, unread[key])
                continue
        raise ConfigError(f"{_where(source, lines, prefix + key)}: does nothing in the "
                          f"{cfg.STAGE} stage ({unread[key]}); remove it")
    single = [k for k in keys if k.startswith("distributed.")]
    if single and world_size <= 1:
        log.warning(
            "%s: %s apply only under torchrun with several processes and do nothing in this one. "
            "To fit a model on one GPU use model.gradient_checkpointing=true, adapter.kind=lora or qlora, "
            "train.optimizer=adamw_8bit, a smaller train.micro_batch_size with a larger train.grad_accum",
            source, ", ".join(prefix + k for k in single))


def read_yaml_with_lines(path: Path) -> tuple[dict, dict[str, int]]:
    text = path.read_text()
    try:
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys to values")
    lines: dict[str, int] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    walk(node, "")
    return data, lines


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(
            f"override {item!r} is not of the form dotted.key=value (e.g. train.max_steps=100)"
        )
    key, raw = item.split("=", 1)
    key = key.strip().lstrip("-")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_overrides(data: dict, lines: dict[str, int], overrides) -> None:
    """Set each ``dotted.key=value`` in ``data`` and mark it (line 0) as the command line's, with
    any section it creates: an error in it is blamed on the override, not on the YAML file."""
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(data, key, value)
        parts = key.split(".")
        for n in range(1, len(parts)):
            lines.setdefault(".".join(parts[:n]), 0)
        lines[key] = 0


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    d = data
    for p in parts[:-1]:
        if not isinstance(d.get(p), dict):
            d[p] = {}
        d = d[p]
    d[parts[-1]] = value


def deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _where(source: str, lines: dict[str, int], key: str) -> str:
    line = lines.get(key)
    if line == 0:
        return f"command line override {key}"
    if line:
        return f"{source}, line {line}, key {key}"
    return f"{source}, key {key}"


def section_default(cls: type, name: str):
    """The default value of field ``name`` of ``cls`` (a stage's own section defaults, such as
    PPO's ``train.lr``, live in its default_factory)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None if f.default is dataclasses.MISSING else f.default


def from_dict(cls: type, data: Any, prefix: str, source: str, lines: dict[str, int], base=None):
    """``cls`` from a mapping; a nested section starts from its parent's default for it, so a
    YAML ``train:`` section of PPO keeps PPO's own defaults for the keys it does not set."""
    if not isinstance(data, dict):
        raise ConfigError(
            f"{_where(source, lines, prefix.rstrip('.'))}: expected a mapping of keys, "
            f"got {type(data).__name__}"
        )
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        not_read = getattr(cls, "NOT_READ", {})
        if key in not_read and key not in names:
            inert, why = not_read[key]
            if value == inert:
                continue  # what the stage does anyway
            raise ConfigError(f"{_where(source, lines, dotted)}: does nothing in this stage ({why}); remove it")
        if key not in names:
            import difflib

            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            section = f"section {prefix.rstrip('.')!r}" if prefix else "the top level"
            raise ConfigError(
                f"{_where(source, lines, dotted)}: unknown key {key!r}.{hint} "
                f"Valid keys in {section}: {', '.join(names)}"
            )
        if dataclasses.is_dataclass(hints[key]) and isinstance(value, dict):
            kwargs[key] = from_dict(hints[key], value, dotted + ".", source, lines, base=section_default(cls, key))
        else:
            kwargs[key] = convert(hints[key], value, dotted, source, lines)
    if dataclasses.is_dataclass(base) and type(base) is cls:
        return dataclasses.replace(base, **kwargs)
    return cls(**kwargs)


def convert(tp, value, dotted: str, source: str, lines: dict[str, int]):
    """Check ``value`` against type ``tp``; return it converted (int -> float, dicts -> dataclasses)."""
    where = _where(source, lines, dotted)
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, dotted + ".", source, lines)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert(a, value, dotted, source, lines)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: {value!r} fits none of {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{where}: {value!r} is not a valid choice; choose one of "
                + ", ".join(repr(c) for c in choices)
            )
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and item_tp is str:
            value = [str(value)]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [convert(item_tp, v, dotted, source, lines) for v in value]
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return {
            convert(k_tp, k, dotted, source, lines): convert(v_tp, v, dotted, source, lines)
            for k, v in value.items()
        }
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "1e-4" (no dot) as a string
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, (dict, list)) or value is None:
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp is Any:
        return value
    raise ConfigError(f"{where}: unsupported type {tp}")  # a schema bug, not a user error


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically), secrets masked (see instructkit.redact)."""
    write_atomic(path, yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False))  # no secrets on disk


# --------------------------------------------------------------------------- pretraining


@dataclass
class PretrainModelSection:
    # A preset of instructkit.models.tiny ("tiny-llama", "tiny-llama-256") whose fields the
    # explicit ones below override; None: give hidden_size, intermediate_size, num_layers and
    # num_heads explicitly.
    shape: str | None = "tiny-llama-256"
    hidden_size: int | None = None
    intermediate_size: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None  # default: num_heads (plain multi-head attention)
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    precision: Precision = "fp32"
    attn_implementation: AttnImpl = "sdpa"
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    compile: bool = False
    gradient_checkpointing: bool = False


@dataclass
class CorpusSection:
    train: list[str] = field(default_factory=list)  # files, folders of .txt, or globs
    seq_len: int = 256
    val_fraction: float = 0.05  # the last windows of the corpus
    split: Literal["blank_lines", "file"] = "blank_lines"  # what one document is
    cache_dir: str | None = None  # default: <output_dir>/corpus
    num_workers: int = 4  # tokenizer processes (<= 1: serial)


@dataclass
class PretrainTokenizerSection:
    # A tokenizer folder or hub id; None: the shipped tiny tokenizer (or a trained one when
    # train is true).
    name_or_path: str | None = None
    train: bool = False  # train a byte-level BPE tokenizer on data.train
    vocab_size: int = 4096
    dir: str | None = None  # where a trained tokenizer is kept; default <output_dir>/tokenizer


@dataclass
class PretrainConfig:
    output_dir: str = "runs/pretrain"
    model: PretrainModelSection = field(default_factory=PretrainModelSection)
    data: CorpusSection = field(default_factory=CorpusSection)
    tokenizer: PretrainTokenizerSection = field(default_factory=PretrainTokenizerSection)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-3, weight_decay=0.1,
                                                                   betas=[0.9, 0.95]))
    log: LogConfig = field(default_factory=LogConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def check(self, world_size: int = 1) -> None:
        """Cross-field checks; raises ConfigError."""
        check_train(self.train, world_size)
        check_distributed(self.distributed)
        m, d, tok = self.model, self.data, self.tokenizer
        if not d.train:
            raise ConfigError("data.train is empty: set it to a text file, a folder of .txt files or a glob")
        if d.seq_len < 8:
            raise ConfigError(f"data.seq_len={d.seq_len} is too small (>= 8)")
        if d.seq_len > m.max_position_embeddings:
            raise ConfigError(
                f"data.seq_len={d.seq_len} is above model.max_position_embeddings="
                f"{m.max_position_embeddings}"
            )
        if not 0.0 <= d.val_fraction < 1.0:
            raise ConfigError("data.val_fraction must be in [0, 1)")
        llama_shape(m)  # the preset or explicit sizes: known, complete, consistent
        if tok.train and tok.name_or_path:
            raise ConfigError("set tokenizer.train=true or tokenizer.name_or_path, not both")
        if tok.train and tok.vocab_size < 300:
            raise ConfigError(
                f"tokenizer.vocab_size={tok.vocab_size} is too small for a byte-level BPE "
                "(256 bytes + special tokens; use >= 300)"
            )

    STAGE: typing.ClassVar[str] = "pretrain"

    def not_applicable(self) -> dict[str, str]:
        out = {**log_not_applicable(self.log), **train_not_applicable(self.train)}
        out.update(dict.fromkeys(("log.generation_freq", "log.generation_prompts", "log.generation_max_new_tokens"),
                                 "pretraining logs no sample generations; run `instructkit generate` on a "
                                 "checkpoint's folder"))
        if not self.tokenizer.train:
            out.update(dict.fromkeys(("tokenizer.vocab_size", "tokenizer.dir"),
                                     "tokenizer.train is false: no tokenizer is trained"))
        return out

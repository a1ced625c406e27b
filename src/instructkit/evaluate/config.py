"""Schema of an evaluation run (``instructkit eval``): the same strict dataclasses as the
training configs, loaded with :func:`instructkit.config.load_config` (unknown keys, wrong
types and invalid choices are ConfigErrors naming the file, line and key)."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from dataclasses import field as dataclasses_field
from pathlib import Path
from typing import Literal

from instructkit.config import DataConfig
from instructkit.errors import ConfigError
from instructkit.redact import mask_text

TASKS = ("perplexity", "reward_accuracy", "samples", "judge", "pairwise")
Task = Literal["perplexity", "reward_accuracy", "samples", "judge", "pairwise"]
# The data formats of DataConfig (auto, alpaca, ..., pairs, hh, ranked, prompts).
DataFormat = typing.get_type_hints(DataConfig)["format"]
Template = Literal["auto", "chat", "alpaca"]


@dataclass
class PerplexitySection:
    # A data file (any SFT format, or format: text for plain text) or a datasets name.
    data: str = ""
    format: DataFormat = "auto"
    split: str = "train"
    fields: dict[str, str] = field(default_factory=dict)
    template: Template = "auto"
    system_prompt: str | None = None
    max_seq_len: int = 1024
    max_examples: int | None = None  # records read
    # false: the loss (and perplexity) of the answers only, as in SFT; true: of every token
    train_on_prompt: bool = False
    batch_size: int = 8

    def data_config(self) -> DataConfig:
        return DataConfig(
            train=self.data, format=self.format, split=self.split, fields=dict(self.fields),
            template=self.template, system_prompt=self.system_prompt,
            max_seq_len=self.max_seq_len, train_on_prompt=self.train_on_prompt,
            max_examples=self.max_examples, val_fraction=0.0, packing=False,
        )


@dataclass
class RewardEvalSection:
    # The reward model (the final/ of `instructkit rm`); None: `model` itself.
    model: str | None = None
    # Preference data: pairs (prompt/chosen/rejected), hh, ranked, oasst; auto detects.
    data: str = ""
    format: DataFormat = "auto"
    split: str = "train"
    fields: dict[str, str] = field(default_factory=dict)
    template: Template = "auto"
    system_prompt: str | None = None
    max_seq_len: int = 1024
    max_examples: int | None = None  # records read
    batch_size: int = 8  # prompts (groups of responses) per forward pass

    def data_config(self) -> DataConfig:
        return DataConfig(
            train=self.data, format=self.format, split=self.split, fields=dict(self.fields),
            template=self.template, system_prompt=self.system_prompt,
            max_seq_len=self.max_seq_len, max_examples=self.max_examples, val_fraction=0.0,
        )


@dataclass
class SamplesSection:
    # The prompt set (golden set): a file of prompts ({"prompt": ...}), or any SFT or
    # preference file (the prompt part of each record is used).
    prompts: str = ""
    field: str = "prompt"  # the prompt field of a prompt-only file
    format: DataFormat = "auto"
    fields: dict[str, str] = dataclasses_field(default_factory=dict)  # as data.fields, other formats
    split: str = "train"
    template: Template = "auto"
    system_prompt: str | None = None
    max_prompts: int | None = None
    max_prompt_len: int = 1024  # longer prompts keep their end
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy (reproducible; a resumed judge run finds its answers)
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 8
    seed: int = 0

    def data_config(self) -> DataConfig:
        fields = dict(self.fields)
        if self.field != "prompt":
            fields["prompt"] = self.field
        return DataConfig(train=self.prompts, format=self.format, split=self.split, fields=fields,
                          template=self.template, system_prompt=self.system_prompt)


@dataclass
class JudgeSection:
    backend: Literal["openai", "hf"] = "openai"
    # openai: any OpenAI-compatible chat-completions server, e.g. http://localhost:11434/v1
    # (Ollama), http://localhost:8000/v1 (vLLM), http://localhost:8080/v1 (llama.cpp server).
    base_url: str = "http://localhost:11434/v1"
    model: str = ""  # the judge model's name on that server
    # NAME of the environment variable holding the API key (sent as "Authorization: Bearer");
    # None: no key. The key itself never goes into a config file or a log.
    api_key_env: str | None = None
    timeout_s: float = 120.0
    retries: int = 3  # extra attempts on connection errors, timeouts, 429 and 5xx
    backoff_s: float = 1.0  # wait before retry k: backoff_s * 2**k
    concurrency: int = 4  # requests in flight
    # hf: a local Hugging Face model (any path `generate` takes), batched generation.
    hf_model: str | None = None
    batch_size: int = 4  # hf backend
    device: str = "auto"  # hf backend
    max_new_tokens: int = 256
    # Prompt files with {prompt} and {response} ({response_1}, {response_2} for pairwise);
    # None: the rubric shipped with instructkit (instructkit/assets/judge_rubric.md and
    # judge_pairwise.md). Copy one and edit it to change the criteria.
    rubric_path: str | None = None
    pairwise_path: str | None = None
    # Responses to judge: a JSONL of {"prompt", "response"}; None: the samples of `model`
    # (generated by the samples task, which then runs as part of judge / pairwise).
    responses: str | None = None


@dataclass
class PairwiseSection:
    # Model B's answers: a JSONL of {"prompt", "response"} matched to A's by prompt, or a
    # model to generate them with the samples settings. Exactly one.
    responses_b: str | None = None
    model_b: str | None = None


@dataclass
class EvalConfig:
    model: str = ""  # the model evaluated: a final/ folder, HF folder, hub id, .gguf, tiny preset
    # None: next to a local model (runs/x/final -> runs/x/eval), else runs/eval/<name>
    output_dir: str | None = None
    tasks: list[Task] = field(default_factory=lambda: ["perplexity", "samples"])
    device: str = "auto"
    # auto: the saved dtype; fp32 / bf16: load in that dtype; bf16-mixed: fp32 + bf16 autocast
    precision: Literal["auto", "fp32", "bf16", "bf16-mixed"] = "auto"
    progress: bool = True
    perplexity: PerplexitySection = field(default_factory=PerplexitySection)
    reward: RewardEvalSection = field(default_factory=RewardEvalSection)
    samples: SamplesSection = field(default_factory=SamplesSection)
    judge: JudgeSection = field(default_factory=JudgeSection)
    pairwise: PairwiseSection = field(default_factory=PairwiseSection)

    STAGE: typing.ClassVar[str] = "eval"

    def not_applicable(self) -> dict[str, str]:
        return eval_not_applicable(self)

    def out_dir(self) -> str:
        """``output_dir``, or when it is unset the folder beside the model (:func:`default_output_dir`)."""
        return self.output_dir if self.output_dir is not None else default_output_dir(self.model or "responses")

    def check(self, world_size: int = 1) -> None:
        """Cross-field checks (only for the tasks chosen); raises ConfigError."""
        if not self.tasks:
            raise ConfigError(f"tasks is empty: choose some of {', '.join(TASKS)}")
        tasks = set(self.tasks)
        needs_model = bool(tasks & {"perplexity", "samples", "reward_accuracy"}) or (
            bool(tasks & {"judge", "pairwise"}) and not self.judge.responses
        )
        if not self.model and needs_model:
            raise ConfigError("model is empty: give the model to evaluate, e.g. model=runs/sft/final")
        if "perplexity" in tasks:
            p = self.perplexity
            if not p.data:
                raise ConfigError("perplexity.data is empty: set it to a data file (e.g. "
                                  "data/selfinstruct_seed_tasks.jsonl)")
            _positive(p.batch_size, "perplexity.batch_size")
            if p.max_seq_len < 8:
                raise ConfigError(f"perplexity.max_seq_len={p.max_seq_len} is too small (>= 8)")
        if "reward_accuracy" in tasks:
            if not self.reward.data:
                raise ConfigError("reward.data is empty: set it to a preference file "
                                  "(pairs, hh, ranked or oasst)")
            _positive(self.reward.batch_size, "reward.batch_size")
        if tasks & {"samples", "judge", "pairwise"}:
            s = self.samples
            generate = "samples" in tasks or not self.judge.responses or (
                "pairwise" in tasks and self.pairwise.model_b)
            if generate and not s.prompts:
                raise ConfigError("samples.prompts is empty: set it to a file of prompts (the "
                                  "golden set), e.g. data/selfinstruct_seed_tasks.jsonl")
            _positive(s.batch_size, "samples.batch_size")
            _positive(s.max_new_tokens, "samples.max_new_tokens")
            if s.temperature < 0:
                raise ConfigError("samples.temperature must be >= 0 (0: greedy)")
            if not 0 < s.top_p <= 1:
                raise ConfigError("samples.top_p must be in (0, 1]")
        if tasks & {"judge", "pairwise"}:
            j = self.judge
            if j.backend == "openai":
                if not j.base_url:
                    raise ConfigError("judge.base_url is empty: the judge server, e.g. "
                                      "http://localhost:11434/v1")
                if not re.match(r"^https?://", j.base_url):
                    raise ConfigError(f"judge.base_url={mask_text(j.base_url)!r} must start with http:// or https://")
                if not j.model:
                    raise ConfigError("judge.model is empty: the judge model's name on the "
                                      "server (e.g. llama3.1:8b for Ollama)")
                if j.api_key_env is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", j.api_key_env):
                    raise ConfigError(
                        "judge.api_key_env must be the NAME of an environment variable holding the "
                        "key (e.g. OPENAI_API_KEY), not the key itself")
            elif not j.hf_model:
                raise ConfigError("judge.backend=hf needs judge.hf_model: a local model to judge with")
            _positive(j.concurrency, "judge.concurrency")
            _positive(j.batch_size, "judge.batch_size")
            _positive(j.max_new_tokens, "judge.max_new_tokens")
            if j.timeout_s <= 0:
                raise ConfigError("judge.timeout_s must be > 0")
            if j.retries < 0 or j.backoff_s < 0:
                raise ConfigError("judge.retries and judge.backoff_s must be >= 0")
            for key, path in (("judge.rubric_path", j.rubric_path), ("judge.pairwise_path", j.pairwise_path),
                              ("judge.responses", j.responses)):
                if path is not None and not Path(path).is_file():
                    raise ConfigError(f"{key}={path}: file not found")
        if "pairwise" in tasks:
            pw = self.pairwise
            if (pw.responses_b is None) == (pw.model_b is None):
                raise ConfigError("pairwise: set exactly one of pairwise.responses_b (a JSONL of "
                                  "model B's answers: prompt, response) and pairwise.model_b")
            if pw.responses_b is not None and not Path(pw.responses_b).is_file():
                raise ConfigError(f"pairwise.responses_b={pw.responses_b}: file not found")


def _section_keys(section, name: str, keys=None) -> list[str]:
    import dataclasses

    return [f"{name}.{f.name}" for f in dataclasses.fields(section) if keys is None or f.name in keys]


def eval_not_applicable(cfg: "EvalConfig") -> dict[str, str]:
    """The keys this evaluation would not read, and why (``instructkit.config.check_given``
    rejects them when set): the sections of tasks not chosen, the other judge backend's keys."""
    tasks, j = set(cfg.tasks), cfg.judge
    out = {}
    off = lambda keys, why: out.update(dict.fromkeys(keys, why))  # noqa: E731
    if "perplexity" not in tasks:
        off(_section_keys(cfg.perplexity, "perplexity"), "the perplexity task is not in tasks")
    if "reward_accuracy" not in tasks:
        off(_section_keys(cfg.reward, "reward"), "the reward_accuracy task is not in tasks")
    generates = "samples" in tasks or (tasks & {"judge", "pairwise"} and not j.responses) or (
        "pairwise" in tasks and cfg.pairwise.model_b)
    if not generates:
        off(_section_keys(cfg.samples, "samples"), "no task generates answers (samples, or judge / pairwise "
                                                   "without judge.responses)")
    if not tasks & {"judge", "pairwise"}:
        off(_section_keys(j, "judge"), "neither judge nor pairwise is in tasks")
    else:
        openai_keys = ("base_url", "model", "api_key_env", "timeout_s", "retries", "backoff_s", "concurrency")
        if j.backend == "hf":
            off(_section_keys(j, "judge", openai_keys), "judge.backend is hf (a local model)")
        else:
            off(_section_keys(j, "judge", ("hf_model", "batch_size", "device")), "judge.backend is openai (a server)")
        if "judge" not in tasks:
            off(["judge.rubric_path"], "the judge task is not in tasks (pairwise uses judge.pairwise_path)")
        if "pairwise" not in tasks:
            off(["judge.pairwise_path"], "the pairwise task is not in tasks")
    if "pairwise" not in tasks:
        off(_section_keys(cfg.pairwise, "pairwise"), "the pairwise task is not in tasks")
    return out


def _positive(value: int, key: str) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0")


def default_output_dir(model: str) -> str:
    """``runs/x/final`` -> ``runs/x/eval``; another local folder ``m`` -> ``m-eval``; a hub
    id or preset -> ``runs/eval/<name>``."""
    p = Path(model).expanduser()
    if p.exists():
        p = p.resolve() if p.name in ("", ".", "..") else p
        if p.name == "final":
            return str(p.parent / "eval")
        return str(p.with_name(p.name + "-eval"))
    if p.name == "final" and p.parent != Path("."):
        return str(p.parent / "eval")
    return str(Path("runs") / "eval" / re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_"))

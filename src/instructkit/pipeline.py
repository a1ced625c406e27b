"""The whole recipe with one command: pretrain? -> SFT -> reward model -> PPO, DPO and/or
GRPO -> eval -> merge -> package, one subfolder per stage, each stage's output feeding the next.

    instructkit pipeline configs/pipeline_smollm2.yaml output_dir=runs/demo

A stage whose result exists is skipped on a re-run; a stage that was interrupted resumes from
its last checkpoint. Each section has the schema of its stage's own config; the pipeline fills
in what chains them (paths of earlier results) and the output folders.
"""

from __future__ import annotations

import copy

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from instructkit.config import DPOConfig, GRPOConfig, PPOConfig, RMConfig, SFTConfig, save_config
from instructkit.errors import ConfigError

StageName = Literal["pretrain", "sft", "rm", "ppo", "dpo", "grpo", "eval", "merge", "package"]
ORDER = ["pretrain", "sft", "rm", "ppo", "dpo", "grpo", "eval", "merge", "package"]
TRAINED = ("sft", "rm", "ppo", "dpo", "grpo")  # the stage sections with a schema of their own


def _pretrain_config():
    from instructkit.config import PretrainConfig

    return PretrainConfig()


def _eval_config():
    from instructkit.evaluate.config import EvalConfig

    return EvalConfig(model="")


@dataclass
class PipelineConfig:
    output_dir: str = "runs/pipeline"
    stages: list[StageName] = field(default_factory=lambda: ["sft", "rm", "ppo", "eval"])
    report: bool = True
    pretrain: Any = None  # PretrainConfig; typed in _SECTIONS (its module loads lazily)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    eval: Any = None  # EvalConfig
    merge_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"

    def check(self, world_size: int = 1) -> None:
        """Cross-field checks of a chained config (:func:`chain`); changes nothing."""
        if "ppo" in self.stages and "rm" not in self.stages and not (
            self.ppo.reward.name_or_path or self.ppo.reward.function
        ):
            raise ConfigError("stages has ppo without rm: set ppo.reward.name_or_path or ppo.reward.function")
        for name in self.stages:
            section = getattr(self, name, None)
            if hasattr(section, "check"):
                try:
                    section.check(world_size)
                except ConfigError as e:
                    raise ConfigError(f"section {name}: {e}") from None


def load_pipeline_config(path, overrides=()) -> PipelineConfig:
    """Like ``load_config``, with the pretrain and eval sections typed by their own schemas."""
    from instructkit import config as schema

    data, lines, source = {}, {}, "<defaults>"
    given: dict[str, dict] = {}  # each section as the user wrote it (before presets)
    if path is not None:
        data, lines = schema.read_yaml_with_lines(Path(path))
        source = str(path)
    in_file = copy.deepcopy(data)
    schema.apply_overrides(data, lines, overrides)
    sections = {}
    for name, factory in (("pretrain", _pretrain_config), ("eval", _eval_config)):
        raw = data.pop(name, None)
        if isinstance(raw, dict):
            given[name] = raw
        if raw is not None:
            cls = type(factory())
            raw = {"model": "", **raw} if name == "eval" else raw
            sections[name] = schema.from_dict(cls, raw, f"{name}.", source, lines)
    given.update({name: data[name] for name in TRAINED if isinstance(data.get(name), dict)})
    for name in TRAINED:  # a stage section may name a preset too
        raw = data.get(name)
        if isinstance(raw, dict) and raw.get("preset") is not None:
            adapter = raw.get("adapter") if isinstance(raw.get("adapter"), dict) else {}
            from instructkit.presets import preset_values

            data[name] = schema.deep_merge(preset_values(str(raw["preset"]), adapter.get("kind", "none") == "none"), raw)
    cfg = schema.from_dict(PipelineConfig, data, "", source, lines)
    for name, value in sections.items():
        setattr(cfg, name, value)
    for name in ("pretrain", "eval"):
        if name in cfg.stages and getattr(cfg, name) is None:
            raise ConfigError(f"stages lists {name} but the config has no {name} section")
    unknown = [s for s in cfg.stages if s not in ORDER]
    if unknown:
        raise ConfigError(f"stages: unknown {unknown}; choose from {ORDER}")
    cfg.stages = sorted(dict.fromkeys(cfg.stages), key=ORDER.index)  # pipeline order, once each
    chain(cfg)  # derived: each stage's output_dir and the results it starts from
    cfg.check()
    for name in cfg.stages:  # a key set in a listed stage's section is read by that stage
        if name in given:
            section = in_file.get(name) if isinstance(in_file.get(name), dict) else {}
            schema.check_given(getattr(cfg, name), given[name], source, lines, schema.env_world_size(), prefix=f"{name}.",
                          in_file={"model": "", **section} if name == "eval" else section)
    return cfg


def stage_dir(cfg: PipelineConfig, name: str) -> Path:
    return Path(cfg.output_dir) / name


def chain(cfg: PipelineConfig) -> None:
    """Point each stage at the results of the earlier ones and at its own subfolder."""
    out = lambda name: str(stage_dir(cfg, name))  # noqa: E731
    final = lambda name: str(stage_dir(cfg, name) / "final")  # noqa: E731
    if "pretrain" in cfg.stages:
        cfg.pretrain.output_dir = out("pretrain")
        cfg.sft.model.name_or_path = final("pretrain")
    cfg.sft.output_dir = out("sft")
    sft_model = final("sft") if "sft" in cfg.stages else cfg.sft.model.name_or_path
    cfg.rm.output_dir = out("rm")
    if "sft" in cfg.stages:  # InstructGPT starts the reward model from the SFT model
        cfg.rm.model.name_or_path = sft_model
    cfg.ppo.output_dir = out("ppo")
    if "sft" in cfg.stages:
        cfg.ppo.policy.name_or_path = sft_model  # the policy and its reference
    if "rm" in cfg.stages:
        cfg.ppo.reward.name_or_path = final("rm")  # reward, and the value model's start
        cfg.ppo.reward.function = None
    cfg.dpo.output_dir = out("dpo")
    if "sft" in cfg.stages:
        cfg.dpo.model.name_or_path = sft_model
    cfg.grpo.output_dir = out("grpo")
    if "sft" in cfg.stages:
        cfg.grpo.policy.name_or_path = sft_model
    if "rm" in cfg.stages:  # the reward model's score, plus any reward.functions the section sets
        cfg.grpo.reward.name_or_path = final("rm")
    if cfg.eval is not None:
        cfg.eval.output_dir = out("eval")
        cfg.eval.model = policy_result(cfg)
        if "rm" in cfg.stages and "reward_accuracy" in cfg.eval.tasks:
            cfg.eval.reward.model = final("rm")


def policy_result(cfg: PipelineConfig) -> str:
    """The policy that eval, merge and package take: PPO's, else GRPO's, else DPO's, else SFT's."""
    for name in ("ppo", "grpo", "dpo", "sft", "pretrain"):
        if name in cfg.stages:
            return str(stage_dir(cfg, name) / "final")
    return cfg.sft.model.name_or_path


def is_done(cfg: PipelineConfig, name: str) -> bool:
    d = stage_dir(cfg, name)
    if name == "eval":
        return (d / "eval.json").is_file()
    if name == "merge":
        return (d / "config.json").is_file()
    if name == "package":
        return d.is_dir() and any(d.glob("*.tar.gz"))
    return (d / "final").is_dir()


def run(cfg: PipelineConfig, allow_new_data: bool = False) -> dict:
    """Run the stages not done yet; ``allow_new_data``: an interrupted stage may resume on changed data."""
    import importlib

    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "pipeline.yaml")
    done = {}
    for name in cfg.stages:
        d = stage_dir(cfg, name)
        if is_done(cfg, name):
            print(f"[pipeline] {name}: done already ({d}), skipped")
            done[name] = "skipped"
            continue
        print(f"[pipeline] {name} -> {d}")
        if name == "eval":
            from instructkit.evaluate.run import run as run_eval

            run_eval(cfg.eval)
        elif name == "merge":
            merge_policy(cfg, d)
        elif name == "package":
            from instructkit.export.package import package_model

            source = stage_dir(cfg, "merge") if "merge" in cfg.stages else Path(policy_result(cfg))
            package_model(source, d, name=out.name or "model")
        else:
            stage = importlib.import_module(f"instructkit.stages.{name}")
            resume = (d / "checkpoints").is_dir() and any((d / "checkpoints").iterdir())
            stage.run(getattr(cfg, name), resume=resume, allow_new_data=allow_new_data)
        done[name] = "ran"
    if cfg.report:
        try:
            from instructkit.report import write_report
        except ImportError:  # the report module is optional until it lands
            write_report = None
        if write_report is not None:
            html, md = write_report(out)
            print(f"[pipeline] report: {html}")
    return done


def merge_policy(cfg: PipelineConfig, d: Path) -> None:
    """Merge the final policy if it is an adapter; a full model is copied as it is."""
    import shutil

    from instructkit.export.merge import merge_adapter

    src = Path(policy_result(cfg))
    if (src / "adapter_config.json").is_file():
        merge_adapter(src, d, dtype=cfg.merge_dtype, overwrite=True)  # the pipeline's own folder
    else:
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("value"))
        tmp.rename(d)


def to_dict(cfg: PipelineConfig) -> dict:
    return dataclasses.asdict(cfg)

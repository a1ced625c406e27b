"""`instructkit <command>`: parse arguments, load the config, call one stage.

A UserError (bad config, bad data, bad path) prints one clear message and exits with code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from instructkit.errors import UserError
from instructkit.redact import mask_text, redact

STAGES = ("sft", "rm", "dpo", "ppo", "grpo", "pretrain")


SCHEMAS = STAGES + ("eval", "pipeline")


def _config_class(stage: str):
    from instructkit.config import DPOConfig, GRPOConfig, PPOConfig, RMConfig, SFTConfig

    if stage == "eval":
        from instructkit.evaluate.config import EvalConfig

        return EvalConfig
    if stage == "pretrain":
        from instructkit.config import PretrainConfig

        return PretrainConfig
    return {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "ppo": PPOConfig, "grpo": GRPOConfig}[stage]


def _guess_stage(path: str) -> str:
    name = Path(path).name
    for stage in SCHEMAS:
        if name.startswith(stage):
            return stage
    return "sft"


def cmd_train(args) -> int:
    from instructkit.config import load_config

    from instructkit.engine import distributed as D

    if args.allow_new_data and not args.resume:
        raise UserError("--allow-new-data goes with --resume (it lets a resumed run go on with changed data)")
    cfg = load_config(_config_class(args.command), args.config, args.overrides)
    import importlib

    stage = importlib.import_module(f"instructkit.stages.{args.command}")
    D.init(cfg.distributed.backend)  # a no-op unless torchrun started several processes
    main = D.is_main()
    result = stage.run(cfg, resume=args.resume, allow_new_data=args.allow_new_data)
    D.shutdown()  # on an error the process exits instead, and torchrun stops the other ranks
    if main:
        print(f"done: {result.steps} steps, final model in {result.final_dir}")
    return 0


def cmd_validate(args) -> int:
    from instructkit.config import load_config, to_dict

    stage = args.stage or _guess_stage(args.config)
    if stage == "pipeline":
        from instructkit.pipeline import load_pipeline_config

        cfg = load_pipeline_config(args.config, args.overrides)
    else:
        cfg = load_config(_config_class(stage), args.config, args.overrides)
    print(f"{args.config}: valid {stage} config")
    if args.show:
        import dataclasses

        import yaml

        if hasattr(cfg, "out_dir"):  # eval: the folder it would write to when output_dir is unset
            cfg = dataclasses.replace(cfg, output_dir=cfg.out_dir())
        print(yaml.safe_dump(redact(to_dict(cfg)), sort_keys=False))
    return 0


def cmd_generate(args) -> int:
    from instructkit.atomic import write_atomic
    from instructkit.generate import check_sampling, generate_responses
    from instructkit.models import load_for_inference

    check_sampling(args.max_new_tokens, args.temperature, args.top_p, args.batch_size,
                   top_k=args.top_k, repetition_penalty=args.repetition_penalty)
    prompts = _read_prompts(args)  # before the model loads: bad input fails fast
    model, tokenizer = load_for_inference(args.model, device=args.device)
    responses = generate_responses(
        model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        repetition_penalty=args.repetition_penalty, batch_size=args.batch_size, seed=args.seed,
        system_prompt=args.system,
    )
    if args.output:
        write_atomic(args.output, "".join(json.dumps({"prompt": p, "response": r}) + "\n"
                                          for p, r in zip(prompts, responses)))
        print(f"wrote {len(responses)} responses to {args.output}")
    else:
        for p, r in zip(prompts, responses):
            print(r if len(prompts) == 1 else json.dumps({"prompt": p, "response": r}))
    return 0


def _read_prompts(args) -> list[str]:
    if bool(args.prompt is not None) == bool(args.prompts):
        raise UserError("give --prompt TEXT or --prompts FILE.jsonl" if not args.prompts else
                        "give --prompt or --prompts, not both")
    if args.prompt is not None:
        return [args.prompt]
    from instructkit.data import load_records

    records = load_records(args.prompts)
    if not records:
        raise UserError(f"{args.prompts}: holds no prompts (no records); one JSON object per line, "
                        f'e.g. {{"{args.field}": "Give three tips for staying healthy."}}')
    prompts = []
    for i, r in enumerate(records, 1):
        if args.field not in r:
            raise UserError(f"{args.prompts}, record {i}: no field {args.field!r} "
                            f"(fields found: {', '.join(r)}); set --field")
        if not str(r[args.field]).strip():
            raise UserError(f"{args.prompts}, record {i}: the {args.field!r} field is empty")
        prompts.append(str(r[args.field]))
    return prompts


def _output(args, default: str | None = None) -> str:
    """The ``output=PATH`` argument (the issue's CLI style), or --output."""
    for item in args.rest:
        if item.startswith("output="):
            return item.split("=", 1)[1]
        raise UserError(f"unexpected argument {item!r}; expected output=PATH")
    if getattr(args, "output", None):
        return args.output
    if default is None:
        raise UserError("give output=PATH")
    return default


def cmd_pipeline(args) -> int:
    from instructkit.pipeline import load_pipeline_config, run

    cfg = load_pipeline_config(args.config, args.overrides)
    done = run(cfg, allow_new_data=args.allow_new_data)
    print("pipeline: " + ", ".join(f"{k} {v}" for k, v in done.items()) + f"; results in {cfg.output_dir}")
    return 0


def cmd_report(args) -> int:
    from instructkit.report import write_report

    html, md = write_report(args.run_dir)
    print(f"wrote {html} and {md}")
    return 0


def cmd_eval(args) -> int:
    from instructkit.config import load_config
    from instructkit.evaluate.config import EvalConfig
    from instructkit.evaluate.run import markdown_table, run

    cfg = load_config(EvalConfig, args.config, args.overrides)
    print(markdown_table(run(cfg)))
    return 0


def cmd_merge(args) -> int:
    from instructkit.export.merge import merge_adapter

    out = merge_adapter(args.adapter, _output(args), dtype=args.dtype, overwrite=args.overwrite)
    print(f"merged model written to {out}")
    return 0


def cmd_export(args) -> int:
    if args.format != "gguf":
        raise UserError(f"--format {args.format!r}: supported formats: gguf (a merged or full model "
                        "folder is already Hugging Face safetensors; use `instructkit merge` for adapters)")
    from instructkit.export.gguf import export_gguf

    out = export_gguf(args.model, _output(args), dtype=args.dtype)
    print(f"GGUF ({args.dtype}) written to {out}")
    return 0


def cmd_package(args) -> int:
    from instructkit.export.package import package_model

    out = package_model(args.model, _output(args, "dist"), name=args.name)
    print(f"archive written to {out}; publish its hash ({out.name}.sha256) apart from it, and "
          f"check with `instructkit verify {out.name} --sha256 <hash or file>`")
    return 0


def cmd_verify(args) -> int:
    from instructkit.export.package import verify_archive

    verify_archive(args.archive, sha256=args.sha256)  # raises with the list of bad files
    if args.sha256:
        print(f"{args.archive}: ok, the archive matches the sha256 given and every file its entry")
    else:
        print(f"{args.archive}: ok, complete and every file matches its entry in metadata.json "
              "(that proves no corruption, not who made it: add --sha256 with the hash published "
              "apart from the archive)")
    return 0


def cmd_convert_meta(args) -> int:
    from instructkit.export.meta import convert_meta_checkpoint

    out = convert_meta_checkpoint(args.meta_dir, _output(args), llama_version=args.llama_version,
                                  dtype=args.dtype, overwrite=args.overwrite)
    print(f"Hugging Face model written to {out}")
    return 0


def cmd_chat(args) -> int:
    from instructkit.evaluate.chat import chat

    try:
        chat(args.model, system_prompt=args.system, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
             repetition_penalty=args.repetition_penalty, device=args.device, seed=args.seed)
    except KeyboardInterrupt:  # Ctrl-C ends a chat, as /exit does
        print(file=sys.stderr)
    return 0


def _command(sub, name: str, func, **kwargs) -> argparse.ArgumentParser:
    """A subcommand running ``func(args)``; ``--debug`` is accepted after it as well as before."""
    p = sub.add_parser(name, **kwargs)
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    p.set_defaults(func=func)
    return p


def _sampling_args(p: argparse.ArgumentParser, seed: int | None) -> None:
    """What generate and chat share: the system prompt, the sampling settings and the device."""
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.9, help="1: off")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=seed)
    p.add_argument("--device", default="auto")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructkit", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    for stage in STAGES:
        p = _command(sub, stage, cmd_train, help=f"train: {stage}")
        p.add_argument("config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
        p.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
        p.add_argument("--allow-new-data", action="store_true",
                       help="with --resume: go on although the data files changed since the checkpoint")

    p = _command(sub, "validate", cmd_validate, help="check a config without running it")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--stage", choices=SCHEMAS, help="schema to check against (default: from the file name)")
    p.add_argument("--show", action="store_true", help="print the resolved config")

    p = _command(sub, "generate", cmd_generate, help="sample responses from a model")
    p.add_argument("model", help="a final/ folder, HF folder, hub id, .gguf file or tiny preset")
    p.add_argument("--prompt")
    p.add_argument("--prompts", help="JSONL (or any data file) of prompts")
    p.add_argument("--field", default="prompt", help="prompt field in --prompts records")
    p.add_argument("--output", help="JSONL file for the responses")
    _sampling_args(p, seed=0)
    p.add_argument("--batch-size", type=int, default=8)

    p = _command(sub, "pipeline", cmd_pipeline, help="the whole recipe: SFT -> RM -> PPO/DPO/GRPO -> eval -> merge -> package")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. output_dir=runs/demo")
    p.add_argument("--allow-new-data", action="store_true",
                   help="an interrupted stage may resume although its data files changed")

    p = _command(sub, "report", cmd_report, help="report.html and report.md of a run or pipeline folder")
    p.add_argument("run_dir")

    p = _command(sub, "eval", cmd_eval, help="perplexity, reward accuracy, samples, LLM-as-judge scores")
    p.add_argument("config")
    p.add_argument("overrides", nargs="*", help="dotted.key=value, e.g. model=runs/ppo/final")

    p = _command(sub, "merge", cmd_merge, help="fold a LoRA/DoRA adapter into its base")
    p.add_argument("adapter")
    p.add_argument("rest", nargs="*", metavar="output=PATH")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16")
    p.add_argument("--overwrite", action="store_true", help="replace a model already at output")

    p = _command(sub, "export", cmd_export, help="export a model folder (GGUF)")
    p.add_argument("model")
    p.add_argument("rest", nargs="*", metavar="output=PATH")
    p.add_argument("--format", default="gguf")
    p.add_argument("--dtype", default="f16", help="f32, f16, bf16 or q8_0")

    p = _command(sub, "package", cmd_package, help="tar.gz with metadata, model card and requirements")
    p.add_argument("model")
    p.add_argument("rest", nargs="*", metavar="output=DIR")
    p.add_argument("--name")

    p = _command(sub, "verify", cmd_verify, help="check the sha256 of every file in a package archive")
    p.add_argument("archive")
    p.add_argument("--sha256", help="the archive's expected sha256 (hex digits, or its .sha256 file)")

    p = _command(sub, "convert-meta", cmd_convert_meta, help="Meta's original Llama 2/3 checkpoint to a Hugging Face folder")
    p.add_argument("meta_dir")
    p.add_argument("rest", nargs="*", metavar="output=PATH")
    p.add_argument("--llama-version", default=None)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--overwrite", action="store_true", help="replace a model already at output")

    p = _command(sub, "chat", cmd_chat, help="interactive chat with streaming output (/reset, /exit)")
    p.add_argument("model")
    _sampling_args(p, seed=None)
    return parser


TORCHRUN_COMMANDS = ("sft", "rm", "dpo", "ppo", "grpo", "pretrain")


def check_launch(command: str) -> None:
    """Only the training stages run on several processes; anything else started by torchrun
    would run once per rank and write the same files at the same time."""
    from instructkit.config import env_world_size

    if env_world_size() > 1 and command not in TORCHRUN_COMMANDS:
        what = ("run its training stages one by one under torchrun, with output_dir and model paths "
                "chained by hand, or the whole pipeline in one process" if command == "pipeline"
                else "run it in one process (without torchrun)")
        raise UserError(f"`instructkit {command}` does not run under torchrun "
                        f"(WORLD_SIZE={env_world_size()}): {what}. Under torchrun: "
                        f"{', '.join(TORCHRUN_COMMANDS)}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # key=value arguments may also come after options (`export M --dtype q8_0 output=m.gguf`)
    args, extra = parser.parse_known_args(argv)
    target = next((getattr(args, a) for a in ("overrides", "rest") if hasattr(args, a)), None)
    if extra and (target is None or any("=" not in e or e.startswith("-") for e in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        target.extend(extra)
    try:
        check_launch(args.command)
        return args.func(args)
    except UserError as e:
        if args.debug:
            raise
        print(f"instructkit {args.command}: error: {mask_text(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint is intact (use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""Package a trained model or adapter as one ``.tar.gz`` that says what it is.

``package_model(model_dir, output_dir)`` writes ``output_dir/<name>.tar.gz`` holding one folder
``<name>/``:

- every file of ``model_dir`` (a ``final/`` folder of a run, a merged folder, any Hugging Face
  model or peft adapter folder), so the unpacked folder loads with ``from_pretrained``;
- ``README.md``: a model card (what it is, base model, method, metrics, usage with transformers,
  peft and ``instructkit generate``); it replaces a README the folder had (peft writes a
  template one);
- ``requirements.txt``: torch, transformers, peft and safetensors pinned to the versions in use;
- ``training_config.yaml``: the run's resolved ``config.yaml`` when the run folder is found
  (the parent of ``final/``, the run a merged folder came from, or ``run_dir``);
- ``metadata.json``: base model, adapter config, training config, the last train and eval
  records of ``metrics.jsonl``, library versions, creation time, and the sha256 and size of
  every other file in the archive.

The archive is written under a temporary name and renamed when complete.
``verify_archive(path)`` re-hashes every member against ``metadata.json``;
``extract_archive(path, dest)`` verifies, then extracts with tarfile's ``data`` filter.
Members with absolute paths, ``..``, links or device files are refused by both.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import os
import platform
import re
import shutil
import tarfile
import time
import zlib
from importlib import metadata as importlib_metadata
from pathlib import Path, PurePosixPath

import yaml

from instructkit.atomic import sha256_file, write_atomic
from instructkit.errors import UserError
from instructkit.redact import redact

log = logging.getLogger("instructkit.export")

ARCHIVE_SUFFIX = ".tar.gz"
SHA256_SUFFIX = ".sha256"
METADATA_FILE = "metadata.json"
CARD_FILE = "README.md"
REQUIREMENTS_FILE = "requirements.txt"
TRAINING_CONFIG_FILE = "training_config.yaml"
GENERATED = (METADATA_FILE, CARD_FILE, REQUIREMENTS_FILE, TRAINING_CONFIG_FILE)
INSTRUCTKIT_META = "instructkit.json"
FORMAT = 1

VERSIONED = ("instructkit", "torch", "transformers", "peft", "safetensors", "tokenizers")
PINNED = ("torch", "transformers", "peft", "safetensors")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
_MAX_METADATA_BYTES = 64 << 20


# --------------------------------------------------------------------------- helpers


def library_versions() -> dict[str, str | None]:
    """Installed versions of the libraries a packaged model depends on, and Python's."""
    out: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            out[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            out[name] = None
    out["python"] = platform.python_version()
    return out


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object")
    return data


def find_run_dir(model_dir: Path, info: dict) -> Path | None:
    """The run folder (with ``config.yaml``) that produced ``model_dir``: its parent for a
    stage's ``final/``, or the run of the adapter a merged folder was made from."""
    candidates = [model_dir.parent]
    if info.get("merged_from"):
        candidates.append(Path(info["merged_from"]).parent)
    for c in candidates:
        if (c / "config.yaml").is_file():
            return c
    return None


def last_metrics(path: Path) -> dict:
    """The last train record and the last eval record of a ``metrics.jsonl`` (lines cut by a
    crash are skipped), and the last step logged."""
    train = evaluation = None
    last_step = None
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        if isinstance(rec.get("step"), int):
            last_step = rec["step"] if last_step is None else max(last_step, rec["step"])
        if "event" in rec:
            continue
        if any(str(k).startswith(("eval_", "golden_")) for k in rec):
            evaluation = rec
        elif any(k != "step" for k in rec):
            train = rec
    return {"train": train, "eval": evaluation, "last_step": last_step}


def _stage_of(config: dict | None) -> str | None:
    if not isinstance(config, dict):
        return None
    if "grpo" in config:
        return "grpo"
    if "ppo" in config or "policy" in config:
        return "ppo"
    if "dpo" in config:
        return "dpo"
    if "rm" in config:
        return "rm"
    if "model" in config:
        return "sft"
    return None


_STAGE_NAMES = {
    "sft": "supervised fine-tuning (SFT)",
    "rm": "reward model training on ranked comparisons",
    "dpo": "direct preference optimization (DPO)",
    "ppo": "PPO against a reward model (RLHF)",
    "grpo": "critic-free RL with group baselines (GRPO / RLOO / REINFORCE++)",
}
_ADAPTER_NAMES = {"lora": "LoRA", "dora": "DoRA", "qlora": "QLoRA (4-bit NF4 base)"}


def _iter_files(root: Path, left_out: dict | None = None) -> list[tuple[str, Path]]:
    """(relative posix path, path) of every regular file under ``root``, sorted. Links are
    followed while they stay inside ``root``; dotfiles and dot-folders (``.env``, ``.git``) and
    links that lead outside are skipped, and named in ``left_out`` ("hidden", "links_outside")
    when given: a packaged folder must not carry a secret or a file from elsewhere."""
    out = []
    seen_dirs = set()
    top = os.path.realpath(root)
    hidden, outside = [], []

    def inside(path: str) -> bool:
        real = os.path.realpath(path)
        return real == top or real.startswith(top + os.sep)

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen_dirs:  # a symlink loop
            dirnames[:] = []
            continue
        seen_dirs.add(real)
        rel_dir = Path(dirpath).relative_to(root)
        for dn in sorted(dirnames):
            rel = (rel_dir / dn).as_posix()
            if dn.startswith("."):
                hidden.extend(r for r, _ in _all_below(Path(dirpath) / dn, rel))
                dirnames.remove(dn)
            elif not inside(os.path.join(dirpath, dn)):
                outside.append(rel + "/")
                dirnames.remove(dn)
        dirnames.sort()
        for fn in sorted(filenames):
            p = Path(dirpath) / fn
            rel = p.relative_to(root).as_posix()
            if fn.startswith("."):
                hidden.append(rel)
            elif not inside(str(p)):
                outside.append(rel)
            elif p.is_file():  # not a broken link, socket or fifo
                out.append((rel, p))
    if left_out is not None:
        left_out.update(hidden=sorted(hidden), links_outside=sorted(outside))
    return sorted(out)


def _all_below(folder: Path, rel: str) -> list[tuple[str, Path]]:
    """Every file under a skipped dot-folder, for the list of what was left out."""
    try:
        return [(f"{rel}/{p.relative_to(folder).as_posix()}", p) for p in folder.rglob("*")
                if not p.is_dir()] or [(rel + "/", folder)]
    except OSError:
        return [(rel + "/", folder)]


def _portable(value, cwd: Path):
    """``value`` with every absolute local path made relative to the working folder, or cut to
    its last component when outside it: an archive travels, the packager's folders stay home."""
    if isinstance(value, dict):
        return {k: _portable(v, cwd) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v, cwd) for v in value]
    if isinstance(value, str) and os.path.isabs(value) and "\n" not in value:
        resolved = Path(value).resolve()
        try:
            return resolved.relative_to(cwd).as_posix() or "."
        except ValueError:
            return resolved.name or value
    return value


def describe_model(model_dir: Path) -> dict:
    """What a model folder holds: kind (adapter / full), task, base model, configs."""
    info = _read_json(model_dir / INSTRUCTKIT_META) if (model_dir / INSTRUCTKIT_META).is_file() else {}
    adapter_cfg = (_read_json(model_dir / "adapter_config.json")
                   if (model_dir / "adapter_config.json").is_file() else None)
    config = _read_json(model_dir / "config.json") if (model_dir / "config.json").is_file() else None
    if adapter_cfg is None and config is None:
        raise UserError(
            f"{model_dir}: neither config.json nor adapter_config.json; package takes a model "
            "folder such as runs/<name>/final, a merged folder, or a Hugging Face model folder"
        )
    kind = "adapter" if adapter_cfg is not None else "full"
    base_cfg = config
    if kind == "adapter" and (model_dir / "base" / "config.json").is_file():
        base_cfg = _read_json(model_dir / "base" / "config.json")
    archs = (base_cfg or {}).get("architectures") or []
    task = "reward-model" if any("SequenceClassification" in a for a in archs) else "causal-lm"
    if adapter_cfg is not None and adapter_cfg.get("task_type") == "SEQ_CLS":
        task = "reward-model"
    base = (info.get("base")
            or (adapter_cfg or {}).get("base_model_name_or_path")
            or (config or {}).get("_name_or_path")
            or None)
    adapter = info.get("adapter")
    if isinstance(adapter, dict):  # a stage's final/ records its adapter section
        adapter = adapter.get("kind")
    if kind == "adapter":
        adapter = "dora" if adapter_cfg.get("use_dora") else (adapter or "lora")
    model = {}
    if base_cfg:
        for key in ("architectures", "model_type", "hidden_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "vocab_size", "dtype",
                    "torch_dtype", "max_position_embeddings"):
            if key in base_cfg:
                model[key] = base_cfg[key]
    weights = [rel for rel, _ in _iter_files(model_dir) if rel.endswith(_WEIGHT_SUFFIXES)]
    if not weights:
        raise UserError(f"{model_dir}: no weights (*.safetensors, *.bin) in the folder; is it complete?")
    return {
        "kind": kind,
        "task": task,
        "base_model": base,
        "base_kind": info.get("base_kind"),
        "base_in_archive": kind == "adapter" and (model_dir / "base" / "config.json").is_file(),
        "adapter": adapter,
        "adapter_config": adapter_cfg,
        "merged_from": info.get("merged_from"),
        "instructkit": info or None,
        "model": model,
        "has_chat_template": (model_dir / "chat_template.jinja").is_file() or bool(
            (model_dir / "tokenizer_config.json").is_file()
            and _read_json(model_dir / "tokenizer_config.json").get("chat_template")
        ),
    }


def requirements_text(versions: dict, name: str) -> str:
    lines = [f"# What {name} was packaged with (pip install -r requirements.txt).",
             "# Install torch first from the index for your platform (CPU or CUDA build)."]
    for pkg in PINNED:
        v = versions.get(pkg)
        if v:
            lines.append(f"{pkg}=={v.split('+')[0]}")
    if versions.get("instructkit"):
        lines.append(f"# instructkit=={versions['instructkit']} (for `instructkit generate`; "
                     "install from its source)")
    return "\n".join(lines) + "\n"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _metrics_table(metrics: dict) -> str:
    rows = []
    for split in ("train", "eval"):
        rec = metrics.get(split) or {}
        for k, v in rec.items():
            if k == "step" or not isinstance(v, (int, float, str)) or isinstance(v, bool):
                continue
            rows.append(f"| {split} | {k} | {_fmt(v)} | {rec.get('step', '')} |")
    if not rows:
        return "No metrics were found (no `metrics.jsonl` next to the model folder).\n"
    return "| split | metric | value | step |\n|---|---|---|---|\n" + "\n".join(rows) + "\n"


def _looks_like_hub_id(name: str | None) -> bool:
    return bool(name) and re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", name) is not None \
        and not Path(name).expanduser().exists()


def model_card(meta: dict) -> str:
    """The README.md of the archive."""
    name = meta["name"]
    d = meta["model_info"]
    base = meta.get("base_model") or "unknown"
    stage = meta.get("stage")
    cfg = meta.get("training_config") or {}
    adapter = d.get("adapter")
    method_bits = []
    if stage:
        method_bits.append(_STAGE_NAMES.get(stage, stage))
    if d["kind"] == "adapter":
        method_bits.append(f"{_ADAPTER_NAMES.get(adapter, adapter)} adapter")
    elif adapter:
        method_bits.append(f"{_ADAPTER_NAMES.get(adapter, adapter)} adapter merged into the base")
    else:
        method_bits.append("full fine-tuning" if stage else "full model")
    method = ", ".join(method_bits)
    ac = meta.get("adapter_config") or {}

    front = ["---", f"library_name: {'peft' if d['kind'] == 'adapter' else 'transformers'}"]
    if _looks_like_hub_id(base):
        front.append(f"base_model: {base}")
    tags = ["instructkit"] + [t for t in (stage, adapter) if t]
    front.append("tags: [" + ", ".join(tags) + "]")
    front.append("---")

    what = "a reward model (a scalar score per sequence)" if d["task"] == "reward-model" \
        else "a causal language model"
    base_note = ""
    if d.get("base_kind") == "tiny":
        base_note = " (instructkit's tiny random preset; its weights are in `base/`)"
    elif d.get("base_in_archive"):
        base_note = " (its weights are in `base/`)"
    lines = [
        f"# {name}",
        "",
        f"{name} is {what} trained with instructkit."
        if stage else f"{name} is {what}, packaged with instructkit.",
        "",
        f"- **Base model:** `{base}`{base_note}",
        f"- **Method:** {method}",
        f"- **Contents:** {'a peft adapter' if d['kind'] == 'adapter' else 'the full weights'} "
        "in Hugging Face format, the tokenizer"
        + (" with its chat template" if d.get("has_chat_template") else ""),
    ]
    if ac:
        lines.append(f"- **Adapter:** r={ac.get('r')}, alpha={ac.get('lora_alpha')}, "
                     f"dropout={ac.get('lora_dropout')}, target modules: "
                     f"{', '.join(sorted(ac.get('target_modules') or [])) or 'default'}")
    data = cfg.get("data") or {}
    train = cfg.get("train") or {}
    if data.get("train"):
        lines.append(f"- **Training data:** `{data['train']}` (format {data.get('format', 'auto')})")
    if train:
        steps = (meta.get("metrics") or {}).get("last_step")
        lines.append(
            f"- **Training:** {steps if steps is not None else train.get('max_steps')} steps, "
            f"learning rate {train.get('lr')}, schedule {train.get('schedule')}"
        )
    lines += ["", "## Metrics", "", _metrics_table(meta.get("metrics") or {})]
    lines += _usage(name, meta, d, base)
    lines += [
        "## Files",
        "",
        f"`metadata.json` lists every file with its sha256; check them with "
        f"`instructkit verify {name}{ARCHIVE_SUFFIX}`. `requirements.txt` pins the library "
        "versions this was packaged with"
        + (", `training_config.yaml` is the resolved training config." if meta.get("training_config")
           else "."),
        "",
        f"Packaged on {meta['created']} with instructkit {meta['versions'].get('instructkit')}, "
        f"torch {meta['versions'].get('torch')}, transformers {meta['versions'].get('transformers')}, "
        f"peft {meta['versions'].get('peft')}.",
        "",
    ]
    return "\n".join(front + [""] + lines)


def _usage(name: str, meta: dict, d: dict, base: str) -> list[str]:
    reward = d["task"] == "reward-model"
    auto = "AutoModelForSequenceClassification" if reward else "AutoModelForCausalLM"
    prompt = "Give three tips for staying healthy."
    if d.get("has_chat_template"):
        make_inputs = [
            f'messages = [{{"role": "user", "content": "{prompt}"}}]',
            "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,",
            '                                       return_tensors="pt", return_dict=True)',
        ]
    else:
        make_inputs = [f'inputs = tokenizer("{prompt}", return_tensors="pt")']
    if reward:
        run = ["score = model(**inputs).logits[0, 0].item()", "print(score)"]
    else:
        run = [
            "out = model.generate(**inputs, max_new_tokens=128)",
            'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))',
        ]
    lines = ["## Usage", "", "Unpack the archive (or check it first with `instructkit verify`):", "",
             "```bash", f"tar xzf {name}{ARCHIVE_SUFFIX}    # creates {name}/",
             "pip install -r " + f"{name}/{REQUIREMENTS_FILE}", "```", ""]
    if d["kind"] == "adapter":
        base_ref = f"{name}/base" if d.get("base_in_archive") else base
        vocab = (d.get("instructkit") or {}).get("vocab_size")
        lines += ["With transformers and peft:", "", "```python",
                  f"from transformers import {auto}, AutoTokenizer",
                  "from peft import PeftModel", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
                  f'base = {auto}.from_pretrained("{base_ref}")']
        if vocab and not d.get("base_in_archive"):
            lines.append(f"base.resize_token_embeddings({vocab})  # the vocabulary it was trained with")
        lines += [f'model = PeftModel.from_pretrained(base, "{name}").eval()']
        if not reward:
            lines.append("# or model = model.merge_and_unload() for a plain model")
        lines += make_inputs + run + ["```", ""]
        if not d.get("base_in_archive") and not _looks_like_hub_id(base):
            lines += [f"The base model `{base}` is not in the archive: it must exist at that path "
                      "(or pass its new location to `from_pretrained`).", ""]
    else:
        lines += ["With transformers:", "", "```python",
                  f"from transformers import {auto}, AutoTokenizer", "",
                  f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
                  f'model = {auto}.from_pretrained("{name}").eval()']
        lines += make_inputs + run + ["```", ""]
    if not reward:
        lines += ["With instructkit:", "", "```bash",
                  f'instructkit generate {name} --prompt "{prompt}"', "```", ""]
    else:
        lines += [f"With instructkit, as the reward model of a PPO run: "
                  f"`reward.name_or_path={name}`.", ""]
    return lines


# --------------------------------------------------------------------------- package


class _HashingReader:
    """A file wrapper that hashes what tarfile reads from it."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n=-1):
        b = self.f.read(n)
        self.sha.update(b)
        self.size += len(b)
        return b


class _HashingWriter:
    """A file wrapper that hashes what is written through it (the archive's sha256 without a
    second read of a many-GB file)."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()

    def write(self, b) -> int:
        self.sha.update(b)
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def _default_name(model_dir: Path) -> str:
    raw = model_dir.parent.name if model_dir.name in ("final", "") else model_dir.name
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", raw).strip("-.") or "model"


def _tarinfo(name: str, size: int, mtime: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = mtime
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def package_model(model_dir, output_dir, name: str | None = None, run_dir=None) -> Path:
    """Write ``output_dir/<name>.tar.gz`` (see the module docstring); returns its path.

    ``name`` defaults to the run's folder name for a ``final/`` folder, else the folder's own
    name. ``run_dir``: where ``config.yaml`` and ``metrics.jsonl`` are (found automatically
    for a ``final/`` folder and for a folder merged from one). An existing archive of the same
    name is replaced."""
    t0 = time.perf_counter()
    src = Path(model_dir).expanduser()
    if not src.is_dir():
        raise UserError(f"{model_dir}: no such folder (package takes a model folder such as "
                        "runs/<name>/final)")
    src = src.resolve()
    name = name or _default_name(src)
    if name.endswith(ARCHIVE_SUFFIX):
        name = name[: -len(ARCHIVE_SUFFIX)]
    if not _NAME_OK.match(name):
        raise UserError(f"name={name!r}: use letters, digits and . _ + - (it becomes a file and "
                        "folder name)")
    out_dir = Path(output_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output={output_dir}: exists and is not a folder")
    out_dir = out_dir.resolve()
    if out_dir == src or src in out_dir.parents:
        raise UserError(f"output={output_dir} is inside the model folder {src}; choose a folder "
                        "outside it")
    made = [d for d in (out_dir, *out_dir.parents) if not d.exists()]
    try:
        return _package(src, out_dir, name, run_dir, t0)
    except BaseException:
        for folder in made:  # a failed package leaves nothing behind, not even its folder
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if still empty
        raise


def _package(src: Path, out_dir: Path, name: str, run_dir, t0: float) -> Path:
    d = describe_model(src)
    run = Path(run_dir).expanduser().resolve() if run_dir else find_run_dir(src, d["instructkit"] or {})
    training_config, metrics = _run_record(run, run_dir)
    left_out: dict = {}
    model_files = _model_files(src, left_out)
    versions = library_versions()
    created = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0)
    meta = _portable({
        "format": FORMAT,
        "name": name,
        "created": created.isoformat().replace("+00:00", "Z"),
        "kind": d["kind"],
        "task": d["task"],
        "base_model": d["base_model"],
        "stage": _stage_of(training_config),
        "method": (d["adapter"] if d["kind"] == "adapter" else
                   f"{d['adapter']}-merged" if d["adapter"] else "full"),
        "source": str(src),
        "run_dir": str(run) if run else None,
        "model_info": {k: v for k, v in d.items() if k not in ("adapter_config",)},
        "left_out": left_out,
        "adapter_config": d["adapter_config"],
        "training_config": training_config,
        "metrics": metrics,
        "versions": versions,
        "files": {},
    }, Path.cwd().resolve())
    generated: dict[str, bytes] = {
        CARD_FILE: model_card(meta).encode(),
        REQUIREMENTS_FILE: requirements_text(versions, name).encode(),
    }
    if training_config is not None:
        generated[TRAINING_CONFIG_FILE] = yaml.safe_dump(training_config, sort_keys=False).encode()
    replaced = [rel for rel, _ in _iter_files(src) if rel in GENERATED]
    if replaced:
        meta["replaced_from_model_folder"] = replaced
    final = _write_archive(out_dir, name, meta, generated, model_files, int(created.timestamp()))
    total = sum(f["size"] for f in meta["files"].values())
    log.info("packaged %s (%d files, %.1f MB) as %s in %.1f s", src, len(meta["files"]), total / 1e6,
             final, time.perf_counter() - t0)
    return final


def _run_record(run: Path | None, run_dir) -> tuple[dict | None, dict]:
    """The run's resolved config (secrets masked, local paths made portable) and its last
    metrics, when the run folder is known."""
    training_config, metrics = None, {"train": None, "eval": None, "last_step": None}
    if run is None:
        return training_config, metrics
    cfg_path = run / "config.yaml"
    if cfg_path.is_file():
        try:
            training_config = yaml.safe_load(cfg_path.read_text())
        except yaml.YAMLError as e:
            raise UserError(f"{cfg_path}: not valid YAML ({e})") from None
        training_config = (_portable(redact(training_config), Path.cwd().resolve())
                           if isinstance(training_config, dict) else None)
    elif run_dir:
        raise UserError(f"run_dir={run_dir}: no config.yaml there")
    if (run / "metrics.jsonl").is_file():
        metrics = last_metrics(run / "metrics.jsonl")
    return training_config, metrics


def _model_files(src: Path, left_out: dict) -> list[tuple[str, Path]]:
    """The model folder's files that go into the archive; what is left out is said."""
    files = [(rel, p) for rel, p in _iter_files(src, left_out) if rel not in GENERATED]
    if left_out["hidden"] or left_out["links_outside"]:
        log.warning("package: left out of the archive: %s", "; ".join(
            f"{what} {', '.join(v[:10])}{' ...' if len(v) > 10 else ''}" for what, v in
            (("dotfiles", left_out["hidden"]), ("links leading outside the folder",
                                                left_out["links_outside"])) if v))
    return files


def _write_archive(out_dir: Path, name: str, meta: dict, generated: dict[str, bytes],
                   model_files: list[tuple[str, Path]], mtime: int) -> Path:
    """``out_dir/<name>.tar.gz`` under a temporary name, hashed as it is written, renamed when
    complete, with its ``.sha256`` beside it; fills ``meta["files"]``."""
    final = out_dir / f"{name}{ARCHIVE_SUFFIX}"
    tmp = out_dir / f".{name}{ARCHIVE_SUFFIX}.tmp-{os.getpid()}"
    sidecar = out_dir / f"{name}{ARCHIVE_SUFFIX}{SHA256_SUFFIX}"
    files: dict[str, dict] = meta["files"]
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        with open(tmp, "wb") as f_out, tarfile.open(fileobj=(raw := _HashingWriter(f_out)), mode="w:gz",
                                                    compresslevel=6, format=tarfile.PAX_FORMAT) as tar:
            top = _tarinfo(name, 0, mtime)
            top.type, top.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(top)
            for rel, data in generated.items():
                tar.addfile(_tarinfo(f"{name}/{rel}", len(data), mtime), io.BytesIO(data))
                files[rel] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for rel, path in model_files:
                size = path.stat().st_size
                with open(path, "rb") as f:
                    reader = _HashingReader(f)
                    try:
                        tar.addfile(_tarinfo(f"{name}/{rel}", size, mtime), reader)
                    except OSError as e:
                        raise UserError(f"{path}: changed while it was packaged ({e})") from None
                files[rel] = {"sha256": reader.sha.hexdigest(), "size": reader.size}
            blob = (json.dumps(meta, indent=1, default=str) + "\n").encode()
            tar.addfile(_tarinfo(f"{name}/{METADATA_FILE}", len(blob), mtime), io.BytesIO(blob))
            raw.flush()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        sidecar.unlink(missing_ok=True)  # never a stale hash beside a new archive
        os.replace(tmp, final)
        # the archive's own hash, in sha256sum's format: published apart from the archive, it
        # proves what metadata.json cannot (that nobody rewrote a file and its entry together)
        write_atomic(sidecar, f"{raw.sha.hexdigest()}  {final.name}\n")
    finally:
        if tmp.exists():
            tmp.unlink()
    return final


# --------------------------------------------------------------------------- verify / extract


def _unsafe_reason(m: tarfile.TarInfo) -> str | None:
    name = m.name
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        return "absolute path"
    parts = PurePosixPath(name.replace("\\", "/")).parts
    if ".." in parts:
        return "'..' in the path"
    if m.issym() or m.islnk():
        return f"a link (to {m.linkname!r})"
    if not (m.isreg() or m.isdir()):
        return "not a regular file or folder"
    return None


def _open_archive(path: Path) -> tarfile.TarFile:
    if not path.is_file():
        raise UserError(f"{path}: no such archive")
    try:
        return tarfile.open(path, "r:*")
    except (tarfile.TarError, OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable .tar.gz archive ({e})") from None


def _hash_members(path: Path) -> tuple[dict[str, tuple[str, int]], bytes | None, set, list[str]]:
    """Every regular member's (sha256, size) by its path inside the top folder, the bytes of
    ``metadata.json``, the top folders, and the unsafe members (never read)."""
    found: dict[str, tuple[str, int]] = {}
    meta_blob = None
    tops, unsafe = set(), []
    with _open_archive(path) as tar:
        try:
            for m in tar:
                why = _unsafe_reason(m)
                if why:
                    unsafe.append(f"{m.name} ({why})")
                    continue
                parts = PurePosixPath(m.name).parts
                if not parts:
                    continue
                tops.add(parts[0])
                if m.isdir():
                    continue
                rel = "/".join(parts[1:])
                f = tar.extractfile(m)
                sha, size, chunks = hashlib.sha256(), 0, []
                while chunk := f.read(1 << 20):
                    sha.update(chunk)
                    size += len(chunk)
                    if rel == METADATA_FILE and size <= _MAX_METADATA_BYTES:
                        chunks.append(chunk)
                if rel == METADATA_FILE:
                    meta_blob = b"".join(chunks)
                else:
                    found[rel] = (sha.hexdigest(), size)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise UserError(f"{path}: the archive is truncated or corrupt ({e})") from None
    return found, meta_blob, tops, unsafe


def _expected_sha256(sha256: str) -> str:
    """The hash ``sha256`` names: 64 hex digits, or a file holding them first (``sha256sum``'s
    format, as the ``.sha256`` file package writes)."""
    text = sha256.strip()
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text) and Path(sha256).expanduser().is_file():
        words = Path(sha256).expanduser().read_text(errors="replace").split()
        text = words[0] if words else ""
    if not re.fullmatch(r"[0-9a-fA-F]{64}", text):
        raise UserError(f"sha256={sha256!r}: expected 64 hexadecimal digits or a file holding them "
                        f"(the {SHA256_SUFFIX} file written beside the archive)")
    return text.lower()


def verify_archive(path, raise_on_error: bool = True, sha256: str | None = None) -> dict:
    """Re-hash every file of an archive written by :func:`package_model` and compare with its
    ``metadata.json``; with ``sha256`` (hex digits or a ``.sha256`` file) check the whole
    archive's hash first.

    The file check proves the archive is complete and every file is the one listed; only the
    archive's hash, obtained apart from it, proves nobody rewrote a file and its entry together.

    Returns ``{"archive", "name", "ok": [...], "mismatched": [...], "missing": [...],
    "extra": [...], "archive_sha256"}`` (paths inside the top folder); raises UserError listing
    the problems when a file differs, is missing or is not listed (unless
    ``raise_on_error=False``). Unsafe members (absolute paths, ``..``, links, devices) and a
    wrong archive hash are always an error."""
    path = Path(path).expanduser()
    want = _expected_sha256(sha256) if sha256 is not None else None
    got_sha = None
    if want is not None:
        if not path.is_file():
            raise UserError(f"{path}: no such archive")
        got_sha = sha256_file(path)
        if got_sha != want:
            raise UserError(f"{path}: the sha256 of the archive is {got_sha}, expected {want}: it is "
                            "not the archive that hash was published for")
    found, meta_blob, tops, unsafe = _hash_members(path)
    if unsafe:
        raise UserError(f"{path}: unsafe archive members, refusing it: " + "; ".join(unsafe[:20]))
    if len(tops) != 1 or meta_blob is None:
        raise UserError(
            f"{path}: not an instructkit package (expected one top folder holding "
            f"{METADATA_FILE}; found {sorted(tops)[:5]})"
        )
    try:
        meta = json.loads(meta_blob)
        listed = meta["files"]
        assert isinstance(listed, dict)
    except (ValueError, KeyError, AssertionError, TypeError):
        raise UserError(f"{path}: {METADATA_FILE} is not valid (no 'files' table)") from None
    report = {"archive": str(path), "name": next(iter(tops)), "ok": [], "mismatched": [],
              "missing": [], "extra": [], "archive_sha256": got_sha}
    for rel, want in sorted(listed.items()):
        got = found.get(rel)
        if got is None:
            report["missing"].append(rel)
        elif not isinstance(want, dict) or got != (want.get("sha256"), want.get("size")):
            report["mismatched"].append(rel)
        else:
            report["ok"].append(rel)
    report["extra"] = sorted(set(found) - set(listed))
    bad = {k: report[k] for k in ("mismatched", "missing", "extra") if report[k]}
    if bad and raise_on_error:
        what = "; ".join(f"{k}: {', '.join(v[:20])}{' ...' if len(v) > 20 else ''}"
                         for k, v in bad.items())
        raise UserError(f"{path}: verification failed ({what})")
    return report


def extract_archive(path, dest) -> Path:
    """Verify ``path``, then extract it into ``dest`` (tarfile's ``data`` filter where Python
    has it, on top of the checks of :func:`verify_archive`); returns ``dest/<name>``. The
    folder appears complete or not at all."""
    report = verify_archive(path)
    dest = Path(dest).expanduser()
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / report["name"]
    if target.exists():
        raise UserError(f"{target} already exists; remove it or extract elsewhere")
    tmp = dest / f".{report['name']}.extract-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        with _open_archive(Path(path).expanduser()) as tar:
            members = tar.getmembers()
            for m in members:  # verify_archive checked these; the archive may have changed since
                if _unsafe_reason(m):
                    raise UserError(f"{path}: unsafe archive member {m.name}")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(tmp, members=members, filter="data")
            else:  # pragma: no cover - Python without the extraction filters
                tar.extractall(tmp, members=members)
        os.rename(tmp / report["name"], target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

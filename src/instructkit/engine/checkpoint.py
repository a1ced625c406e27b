"""Checkpoints: trainable weights, optimizer, RNG and loop state, written atomically.

Layout of ``checkpoints/step-000120/``::

    weights.safetensors     trainable parameters only (the adapter under LoRA)
    optimizer.safetensors   optimizer tensors, keyed "<param index>.<name>"
    rng.safetensors         RNG states
    state.json              loop state, optimizer hyper-parameters, RNG meta, what run wrote
                            it (``identity``), and the size and sha256 of every other file;
                            written last

A checkpoint is built in ``step-000120.tmp`` and renamed when complete, so a crash or kill
leaves either the whole new checkpoint or none of it; the previous one stays loadable. A
checkpoint damaged later (a truncated or edited file) fails ``verify_checkpoint`` and resume
falls back to the newest intact one. Nothing here is pickled: safetensors for tensors, JSON
for the rest.

Under torchrun the model is sharded, and a checkpoint is written by every rank at once with
``torch.distributed.checkpoint`` (DCP)::

    sharded/                trainable weights and optimizer state, keyed by parameter name
    rng-00000.safetensors   each rank's RNG state (+ rng-00000.json)
    state.json              loop state, written last by rank 0

DCP stores tensors with their global shapes, so such a checkpoint loads on any number of
ranks, and in a single process.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from instructkit.atomic import replace_dir, sha256_file
from instructkit.errors import UserError

_NAME = re.compile(r"^step-(\d+)$")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    for key, v in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = v
    # this run's base rates win over the saved ones (the schedule scales them each step), as
    # train.lr did before groups kept a base_lr; older checkpoints have none
    base = [{k: g[k] for k in ("base_lr", "name") if k in g} for g in optimizer.param_groups]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    except ValueError as e:  # another number or size of parameter groups
        raise UserError(f"the checkpoint's optimizer state does not fit this run's parameters ({e}); it was "
                        "written with other trainable parameters or by an older instructkit: start in a new "
                        "output_dir") from None
    for g, keep in zip(optimizer.param_groups, base):
        g.update(keep)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:  # pragma: no cover - not every filesystem allows it
        pass


def file_records(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file under ``folder`` but state.json, by relative path."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "state.json"}


def _write_state(folder: Path, state: dict) -> None:
    with open(folder / "state.json", "w") as f:
        json.dump({**state, "files": file_records(folder)}, f)
        f.flush()
        os.fsync(f.fileno())


def read_state(path: Path) -> dict:
    return json.loads((Path(path) / "state.json").read_text())


def verify_checkpoint(path: Path) -> str | None:
    """None when ``path`` is intact; else what is wrong with it. A checkpoint written before
    file records were kept is taken as it is."""
    path = Path(path)
    try:
        state = read_state(path)
    except (OSError, ValueError) as e:
        return f"state.json cannot be read ({e.__class__.__name__})"
    if not isinstance(state, dict) or "step" not in state:
        return "state.json is not a checkpoint state"
    for name, want in (state.get("files") or {}).items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, {want['bytes']} were written"
        if sha256_file(f) != want["sha256"]:
            return f"{name} does not match the sha256 recorded when it was written"
    return None


def save_checkpoint(
    ckpt_root: Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    loop_state: dict,
    rng: dict,
    keep_last: int,
    extra_tensors: dict[str, torch.Tensor] | None = None,
    identity: dict | None = None,
) -> Path:
    ckpt_root = Path(ckpt_root)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f"step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        weights = {n: t.cpu().contiguous() for n, t in trainable_state(model).items()}
        if extra_tensors:
            weights.update({f"extra.{k}": v.cpu().contiguous() for k, v in extra_tensors.items()})
        save_file(weights, tmp / "weights.safetensors")
        opt_t, opt_meta = optimizer_tensors(optimizer)
        save_file(opt_t, tmp / "optimizer.safetensors")
        save_file({k: v.contiguous() for k, v in rng["tensors"].items()}, tmp / "rng.safetensors")
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _write_state(tmp, {"step": step, "loop": loop_state, "optimizer": opt_meta, "rng": rng["meta"],
                           "identity": identity})
        replace_dir(tmp, final)  # re-saving a step (after a resume) replaces it whole
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written one only takes space (a full disk's)
        raise
    _fsync_dir(ckpt_root)
    prune(ckpt_root, keep_last)
    return final


def list_checkpoints(ckpt_root: Path) -> list[Path]:
    ckpt_root = Path(ckpt_root)
    if not ckpt_root.is_dir():
        return []
    found = []
    for p in ckpt_root.iterdir():
        m = _NAME.match(p.name)
        if m and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1] if found else None


def prune(ckpt_root: Path, keep_last: int) -> None:
    for p in Path(ckpt_root).glob("step-*.tmp"):
        shutil.rmtree(p, ignore_errors=True)
    if keep_last <= 0:
        return
    for p in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict:
    """Load weights and optimizer state in place; return {"step", "loop", "rng", "extra"}."""
    path = Path(path)
    state = read_state(path)
    weights = load_file(path / "weights.safetensors")
    extra = {k[len("extra."):]: v for k, v in weights.items() if k.startswith("extra.")}
    check_same_tensors(path, {k: v.shape for k, v in weights.items() if not k.startswith("extra.")},
                       {n: p.shape for n, p in model.named_parameters() if p.requires_grad})
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            if not name.startswith("extra."):
                params[name].copy_(value.to(params[name].dtype))
    if optimizer is not None:
        load_optimizer(optimizer, load_file(path / "optimizer.safetensors"), state["optimizer"])
    rng = {"tensors": load_file(path / "rng.safetensors"), "meta": state["rng"]}
    return {"step": state["step"], "loop": state["loop"], "rng": rng, "extra": extra}


def check_same_tensors(path: Path, saved: dict, trainable: dict) -> None:
    """Refuse a checkpoint whose trainable tensors are not this model's (a changed adapter.r,
    target_modules or freeze_layers), naming the first difference."""
    def first(names):
        return sorted(names)[0]

    if set(saved) - set(trainable):
        name = first(set(saved) - set(trainable))
        why = f"it holds {name!r}, which this model does not train"
    elif set(trainable) - set(saved):
        name = first(set(trainable) - set(saved))
        why = f"it lacks {name!r}, which this model trains"
    else:
        bad = [n for n in saved if tuple(saved[n]) != tuple(trainable[n])]
        if not bad:
            return
        why = f"{bad[0]!r} has shape {tuple(saved[bad[0]])} there and {tuple(trainable[bad[0]])} here"
    raise UserError(f"--resume: {path} does not fit this run's model: {why} (was the adapter or "
                    "freeze_layers changed?); resume with the settings of its config.yaml, or start in a new output_dir")


# --------------------------------------------------------------------------- sharded (DCP)


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / "sharded").is_dir()


def _rng_files(folder: Path, rank: int) -> tuple[Path, Path]:
    return folder / f"rng-{rank:05d}.safetensors", folder / f"rng-{rank:05d}.json"


def save_sharded_checkpoint(ckpt_root: Path, step: int, model: torch.nn.Module,
                            optimizer: torch.optim.Optimizer, loop_state: dict, rng: dict,
                            keep_last: int, identity: dict | None = None) -> Path:
    """Every rank calls this; rank 0 publishes the folder once all ranks have written."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    from instructkit.engine import distributed as D

    ckpt_root = Path(ckpt_root)
    final, tmp = ckpt_root / f"step-{step:06d}", ckpt_root / f"step-{step:06d}.tmp"
    if D.is_main():
        ckpt_root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
    D.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "sharded"))
    rng_t, rng_j = _rng_files(tmp, D.rank())
    save_file({k: v.contiguous() for k, v in rng["tensors"].items()}, rng_t)
    rng_j.write_text(json.dumps(rng["meta"]))
    D.barrier()
    if D.is_main():
        _write_state(tmp, {"step": step, "loop": loop_state, "format": "dcp", "world_size": D.world_size(),
                           "identity": identity})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        _fsync_dir(ckpt_root)
        prune(ckpt_root, keep_last)
    D.barrier()
    return final


def load_sharded_checkpoint(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load a DCP checkpoint into ``model`` (sharded or not) and ``optimizer``, whatever the
    number of ranks that wrote it; same return value as ``load_checkpoint``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    from instructkit.engine import distributed as D

    path = Path(path)
    state = read_state(path)
    options = StateDictOptions(ignore_frozen_params=True)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options) if optimizer is not None else (
        get_state_dict(model, [], options=options)[0], None)
    target = {"model": model_sd} if optim_sd is None else {"model": model_sd, "optim": optim_sd}
    dcp.load(target, checkpoint_id=str(path / "sharded"))
    # strict=False: the frozen weights are not in the checkpoint (dcp.load above already failed
    # on any trainable tensor the checkpoint lacks).
    set_state_dict(model, optimizer if optimizer is not None else [], model_state_dict=target["model"],
                   optim_state_dict=target.get("optim", {}),
                   options=StateDictOptions(ignore_frozen_params=True, strict=False))
    rng_t, rng_j = _rng_files(path, D.rank())
    if not rng_t.exists():  # more ranks than wrote the checkpoint: start from rank 0's streams
        rng_t, rng_j = _rng_files(path, 0)
    rng = {"tensors": load_file(rng_t), "meta": json.loads(rng_j.read_text())}
    return {"step": state["step"], "loop": state["loop"], "rng": rng, "extra": {}}

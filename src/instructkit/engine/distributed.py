"""Several processes under ``torchrun``: PyTorch's FSDP2 (``fully_shard``) or DDP.

Nothing here is a distributed engine of our own: sharding, gradient reduction and the
sharded checkpoints are PyTorch's (``torch.distributed.fsdp``, ``DistributedDataParallel``,
``torch.distributed.checkpoint``). This module decides which one to use and keeps the
stages unaware of it:

- ``init`` starts the process group when ``torchrun`` set ``WORLD_SIZE > 1``;
- ``wrap`` shards or replicates a model and returns a :class:`Wrapped` the stage holds. Its
  distributed root is an ``Entry`` module whose forward runs any function of the model, so
  every pass the stages make (LM loss with the chunked head, reward scores, values,
  ``generate``) is ``wrapped(fn, ...)``: one forward of the root, which FSDP2 / DDP see;
- ``global_sum`` and friends give the loss normalisers and metrics over all ranks, so a run
  on N ranks with global batch B matches a run on one process with batch B.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from instructkit.config import env_world_size, resolve_plan
from instructkit.errors import UserError


# --------------------------------------------------------------------------- process group


def _dist():
    import torch.distributed as dist

    return dist


def active() -> bool:
    """True inside a process group of more than one rank."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def is_main() -> bool:
    return rank() == 0


def init(backend: str = "auto") -> bool:
    """Start the process group when launched by torchrun with several processes.

    Returns True when running distributed. CUDA ranks use NCCL on their LOCAL_RANK's GPU;
    CPU ranks use gloo (the tests, and anyone without GPUs).
    """
    dist = _dist()
    if env_world_size() <= 1:
        return False
    if dist.is_initialized():
        return True
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    if active():
        dist = _dist()
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if active():
        _dist().barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (it may build caches: a converted GGUF model, a tokenized
    corpus); the other ranks then run it and find the caches ready."""
    if not active():
        yield
        return
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def _backend_device() -> torch.device:
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def global_sum(x: float | int) -> float:
    """Sum of a number over all ranks (the number itself in one process)."""
    return global_sums([x])[0]


def global_sums(values: list[float]) -> list[float]:
    """Element-wise sums over ranks, in one collective."""
    if not active() or not values:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_backend_device())
    _dist().all_reduce(t)
    return t.tolist()


def global_max(x: float) -> float:
    """Maximum of a number over all ranks (the number itself in one process)."""
    if not active():
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=_backend_device())
    _dist().all_reduce(t, op=_dist().ReduceOp.MAX)
    return float(t)


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum of a tensor over ranks (gloo wants CPU tensors, NCCL CUDA ones)."""
    if not active():
        return t
    dev = _backend_device()
    buf = t.detach().to(dev, torch.float64)
    _dist().all_reduce(buf)
    t.copy_(buf.to(t.device, t.dtype))
    return t


def gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenation over ranks (rank order) of a 1-D tensor whose length may differ per rank:
    metrics over all of a step's pairs, not just this rank's."""
    if not active():
        return t
    dist, dev = _dist(), _backend_device()
    n = torch.tensor([t.numel()], device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    dist.all_gather(sizes, n)
    width = int(max(int(s) for s in sizes))
    buf = torch.zeros(width, dtype=torch.float64, device=dev)
    buf[: t.numel()] = t.detach().reshape(-1).to(dev, torch.float64)
    parts = [torch.zeros_like(buf) for _ in sizes]
    dist.all_gather(parts, buf)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)]).to(t.device, t.dtype)


def sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """A new tensor: ``t`` summed over all ranks (``t`` itself in one process)."""
    return all_reduce_sum_(t.detach().clone()) if active() else t


def rank_slice(items: list) -> list:
    """This rank's share of a step's micro-batches: every N-th from its rank on.

    Every rank plans the same global list (the plan is a pure function of seed and epoch),
    so each example is seen by exactly one rank per epoch."""
    return list(items[rank()::world_size()]) if active() else list(items)


# --------------------------------------------------------------------------- strategy


# --------------------------------------------------------------------------- wrapping


class Entry(nn.Module):
    """The distributed root: its forward is ``fn(model, *args, **kwargs)``.

    FSDP2 gathers the root's own parameters (embeddings, final norm, heads) in the root's
    forward, and DDP prepares its gradient reduction there; routing every pass through this
    forward lets a stage use the decoder or the LM head weight directly (the chunked loss,
    reward and value heads) and call ``generate``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, fn, *args, **kwargs):
        return fn(self.module, *args, **kwargs)


class Wrapped:
    """What :func:`wrap` returns and a stage holds: the model and, under torchrun, its
    distributed root. Every training pass is a call of it, ``wrapped(fn, *args)``, which runs
    ``fn(model, *args)``: in one process directly, under torchrun as one forward of the root
    (where FSDP2 gathers the root's parameters and DDP prepares its reduction). Holding this
    instead of finding the root at run time means a pass cannot silently skip it.

    ``module`` is the plain model: for the optimizer, counting and saving, never for a pass."""

    def __init__(self, module: nn.Module, root: nn.Module | None = None):
        self.module, self.root = module, root

    def __call__(self, fn, *args, **kwargs):
        if self.root is None:
            return fn(self.module, *args, **kwargs)
        return self.root(fn, *args, **kwargs)

    @property
    def sharded(self) -> bool:
        """True when checkpoints must go through torch.distributed.checkpoint."""
        return self.root is not None

    @contextlib.contextmanager
    def grad_sync(self, enabled: bool):
        """Skip the gradient reduction on micro-batches before the last of a step (each rank
        accumulates locally; the last backward reduces the sum)."""
        if self.root is None or enabled:
            yield
            return
        if hasattr(self.root, "no_sync"):  # DDP
            with self.root.no_sync():
                yield
            return
        self.root.set_requires_gradient_sync(False)  # FSDP2
        try:
            yield
        finally:
            self.root.set_requires_gradient_sync(True)


def wrapped(model) -> Wrapped:
    """A model used outside a training stage (evaluation, generation), as a :class:`Wrapped`
    of one process; a Wrapped is returned as it is."""
    return model if isinstance(model, Wrapped) else Wrapped(model)


def wrap(model: nn.Module, dcfg, precision: str, device: torch.device) -> Wrapped:
    """Shard (FSDP2) or replicate (DDP) ``model`` across the ranks; returns the handle every
    pass goes through.

    FSDP2: ``fully_shard`` on every decoder layer, then on the root, with bf16 compute and
    fp32 gradient reduction for ``precision=bf16-mixed`` (the fp32 shards stay the master
    weights). Build the optimizer AFTER this call: FSDP2 replaces parameters by sharded ones.
    In one process this does nothing.
    """
    if not active():
        return Wrapped(model)
    plan = resolve_plan(dcfg)
    if plan.cpu_offload and device.type == "cpu":
        raise UserError("distributed.cpu_offload moves GPU shards into CPU memory; these ranks run on the "
                        "CPU already: drop it")
    if plan.strategy == "fsdp" and any(type(p).__name__ == "Params4bit" for p in model.parameters()):
        raise UserError(
            "adapter.kind=qlora cannot be sharded by FSDP2 (bitsandbytes' 4-bit weights are not "
            "shardable); use distributed.strategy=ddp (each GPU holds the 4-bit base), or LoRA "
            "with model.precision=bf16 under FSDP2"
        )
    entry = Entry(model)
    if plan.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [device.index] if device.type == "cuda" else None
        root = DDP(entry, device_ids=ids)
    else:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        from instructkit.models.adapters import decoder_layers

        kwargs = {"reshard_after_forward": plan.reshard_after_forward}
        if precision == "bf16-mixed":
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if plan.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        root = fully_shard(entry, **kwargs)
    return Wrapped(model, root)


def plain_norm(norm) -> float:
    """A gradient norm as a float (FSDP2 returns a DTensor reduced over the shards)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)


@contextlib.contextmanager
def gathered(run: Wrapped):
    """Inside the block, rank 0's ``model`` holds ordinary full tensors (fp32 master weights,
    gathered from the shards) so ``save_pretrained`` and friends work; the other ranks get
    nothing and should only wait. Every rank must enter. In one process: the model as is.

    Meant for the end of a run: the model's FSDP state is not restored afterwards."""
    model = run.module
    if not run.sharded:
        yield model
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main():
        new_params: dict[int, nn.Parameter] = {}  # tied weights (embeddings = LM head) stay tied
        for name, p in list(model.named_parameters(remove_duplicate=False)):
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            if id(p) not in new_params:
                if name not in full:
                    raise RuntimeError(f"gathering the model: no full tensor for {name}")
                new_params[id(p)] = nn.Parameter(full[name], requires_grad=p.requires_grad)
            owner._parameters[leaf] = new_params[id(p)]
        for name, b in list(model.named_buffers()):
            if hasattr(b, "full_tensor"):
                owner_name, _, leaf = name.rpartition(".")
                owner = model.get_submodule(owner_name) if owner_name else model
                owner._buffers[leaf] = b.full_tensor().cpu()
    run.root = None  # the model holds plain tensors now: passes run on it directly
    try:
        yield model if is_main() else None
    finally:
        barrier()


def save_on_main(run: Wrapped, save: Callable[[nn.Module], object], path: Path) -> Path:
    """``save(model)`` on rank 0 with the full weights gathered (every rank must call this);
    returns the folder ``save`` reports, or ``path`` on the other ranks."""
    with gathered(run) as full:
        return Path(save(full)) if full is not None else Path(path)

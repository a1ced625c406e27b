"""Run under torchrun: global advantage whitening across ranks equals whitening everything in
one process. Rank r holds its own rows; rank 0 writes the comparison to argv[1]."""

import json
import sys

import torch
import torch.distributed as dist

from instructkit.losses import rl
from instructkit.engine import distributed as D

D.init("gloo")
g = torch.Generator().manual_seed(0)
values = torch.randn(6, 5, generator=g) * 3 + 1  # [B, T]: the whole batch, 3 rows per rank
mask = (torch.rand(6, 5, generator=g) > 0.3).float()
mask[:, 0] = 1
mine = slice(3 * D.rank(), 3 * D.rank() + 3)
local = rl.masked_whiten(values[mine], mask[mine], sum_over_ranks=D.sum_over_ranks)
alone = rl.masked_whiten(values[mine], mask[mine])  # this rank's statistics only
parts = [torch.zeros_like(local) for _ in range(D.world_size())]
dist.all_gather(parts, local)
if D.is_main():
    reference = rl.masked_whiten(values, mask)  # one process, all rows
    together = torch.cat(parts)
    json.dump({"max_err": float((together - reference).abs().max()),
               "rank0_local_err": float((alone - reference[mine]).abs().max())}, open(sys.argv[1], "w"))
D.shutdown()

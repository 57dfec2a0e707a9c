"""Run by tests/test_distributed.py under torchrun (2 ranks, gloo): DDP gradients of embedding +
DAGFM on each rank's round-robin share of a global batch vs one process on the whole batch.

Rank 0 writes the largest relative gradient difference per interaction (and the number of DDP
buckets) to the JSON file named on the command line, and the number of gloo threads left running
after ``dagfm_ext.distributed.shutdown()``.
"""
import json
import sys

import torch
import torch.distributed as dist
from gloo_threads import gloo_threads
from torch.nn.parallel import DistributedDataParallel

from dagfm_ext import distributed
from dagfm_ext.data import FeatureSchema, FieldEmbedding, FieldSpec
from dagfm_ext.modules import DAGFM
from dagfm_ext.scorer import Scorer


def build(kind: str) -> Scorer:
    torch.manual_seed(0)
    schema = FeatureSchema([FieldSpec("a", vocab={str(i): i for i in range(1, 6)}),
                            FieldSpec("b", vocab={str(i): i for i in range(1, 4)}),
                            FieldSpec("g", kind="multi", max_len=3, vocab={str(i): i for i in range(1, 5)}),
                            FieldSpec("c", vocab={str(i): i for i in range(1, 8)})])
    return Scorer(FieldEmbedding(schema, 4), DAGFM(4, 4, 3, kind)).double()


def grads(model, x, y, rows, world):
    # The pipeline's loss: sum over this rank's rows / global rows * world (DDP then averages).
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y, reduction="sum") / rows * world
    loss.backward()


def main() -> int:
    distributed.init_from_env("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(1)
    rows = 7  # an odd global batch: the ranks' shares differ by one row
    x = torch.stack([torch.randint(0, 6, (rows,), generator=gen), torch.randint(0, 4, (rows,), generator=gen),
                     torch.randint(-1, 5, (rows,), generator=gen), torch.randint(-1, 5, (rows,), generator=gen),
                     torch.randint(0, 5, (rows,), generator=gen), torch.randint(0, 8, (rows,), generator=gen)], 1)
    x[:, 2] = x[:, 2].clamp_min(0)  # the first slot of a multi field is never padding
    y = torch.randint(0, 2, (rows,), generator=gen).double()
    result = {}
    for kind in ("inner", "outer", "kernel"):
        # One bucket per parameter: each of the op's gradients is all-reduced on its own, from
        # DDP's autograd hook, while the rest of the backward is still running.
        ddp = DistributedDataParallel(build(kind), bucket_cap_mb_list=[1e-4] * 8)
        grads(ddp, x[rank::world], y[rank::world], rows, world)
        single = build(kind)
        grads(single, x, y, rows, 1)
        worst = max(((a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-30)).item()
                    for a, b in zip(ddp.module.parameters(), single.parameters()))
        result[kind] = {"max_rel_err": worst,
                        "buckets": len(str(ddp._get_ddp_logging_data().get("bucket_sizes", "")).split(","))}
        del ddp  # a live DDP wrapper keeps the process group (and its threads) alive
    distributed.shutdown()
    if rank == 0:
        result = {"grads": result, "gloo_threads_after_shutdown": gloo_threads()}
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

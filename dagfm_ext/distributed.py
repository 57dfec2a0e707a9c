"""Multi-process training under ``torchrun``: process-group set-up and the collectives the pipeline uses.

Sharding rule (training and evaluation alike): every global batch of ``batch_size`` rows is dealt
round-robin, rank r taking rows r, r + W, r + 2W, ... (``TabularData.batches(rank=, world_size=)``).
So W processes see exactly the batches one process sees, the global batch stays the configured
one (about batch / W rows per rank), and no row is padded or repeated: gathered predictions are
put back in the single-process order and metrics are computed on exactly the split.
"""
from __future__ import annotations

import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Context", "init_from_env", "context", "shutdown"]

_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def init_from_env(device: str) -> str:
    """Join the process group when launched by torchrun with WORLD_SIZE > 1 (NCCL for a CUDA
    device, gloo for CPU). Returns the device this rank should use: ``cuda:LOCAL_RANK`` on GPU."""
    world = os.environ.get("WORLD_SIZE")
    if world is None or int(world) <= 1 or dist.is_initialized():
        return device
    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but the torchrun variables {missing} are not set; "
                           "launch with torchrun --nproc_per_node=N -m dagfm_ext run ...")
    # Imported before the group exists on purpose: its functions take ``group=group.WORLD`` as
    # default arguments, so imported later (DDP imports it lazily) they would hold the default
    # group forever, destroy_process_group could not stop gloo's worker threads, and a worker
    # thread still releasing a backward's all-reduce while the interpreter exits aborts the process.
    import torch.distributed.nn  # noqa: F401
    dev = torch.device(device)
    if dev.type == "cuda":
        # One GPU per process; an index in --device would put every rank on the same GPU.
        local = int(os.environ["LOCAL_RANK"])
        if local >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK={local}: expected one GPU per process, but only "
                               f"{torch.cuda.device_count()} are visible; lower --nproc_per_node")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
        dist.init_process_group("nccl", device_id=dev)
    else:
        dist.init_process_group("gloo")
    return str(dev)


def shutdown() -> None:
    """Leave the process group and stop its worker threads (see the import of torch.distributed.nn)."""
    if dist.is_initialized():
        gc.collect()  # DDP wrappers left in reference cycles also hold the group
        dist.destroy_process_group()


@dataclass(frozen=True)
class Context:
    """This process's place in the run; ``world_size == 1`` makes every method a no-op."""
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, values, device) -> list:
        """Element-wise sum of a few floats over all ranks."""
        if not self.distributed:
            return [float(v) for v in values]
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def gather_batch(self, local: torch.Tensor, batch_rows: int) -> torch.Tensor:
        """Every rank's share of one global batch (``batch_rows`` rows, dealt round-robin) put
        back in batch order, on every rank."""
        if not self.distributed:
            return local
        W = self.world_size
        share = -(-batch_rows // W)  # all_gather needs equal sizes: pad each share to the largest
        if local.shape[0] != len(range(self.rank, batch_rows, W)):
            raise RuntimeError(f"local: expected {len(range(self.rank, batch_rows, W))} rows of a "
                               f"{batch_rows}-row batch on rank {self.rank}, got {local.shape[0]}")
        padded = local.new_zeros((share, *local.shape[1:]))
        padded[: local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(W)]
        dist.all_gather(parts, padded)
        out = local.new_empty((batch_rows, *local.shape[1:]))
        for r, part in enumerate(parts):
            out[r::W] = part[: len(range(r, batch_rows, W))]  # the padding is dropped here
        return out


def context() -> Context:
    """The current process group's rank and size (rank 0 of 1 when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return Context(dist.get_rank(), dist.get_world_size())
    return Context()

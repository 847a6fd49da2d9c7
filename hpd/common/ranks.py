"""Several processes, one run: `torchrun --nproc_per_node N -m hpd.pipeline.cli run` (or a cluster scheduler that
sets the same variables: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) starts N copies of `hpd run`.

Every copy walks the same stage graph. The teacher-side stages (generate, score, refresh, rescore) split
their shards between the ranks (shard i goes to rank i mod N), each rank writes its own shards into the same
hidden directory, and rank 0 publishes one manifest once all are written (hpd/storage/shard_writer.py): the same cache,
byte for byte, as one process would build. distill trains with the Trainer's own DDP (or FSDP / DeepSpeed through its
options). Every other stage runs on rank 0 while the others wait. Rank 0 alone writes run manifests and logs.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) when run directly."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def init() -> None:
    """Join the process group (gloo on CPU, nccl on GPUs) when launched as several processes."""
    import torch
    import torch.distributed as dist

    if world()[1] > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


@contextmanager
def held_by_rank0(ctx, lock):
    """`lock` (a file lock) held for the whole group: rank 0 takes it, and no rank goes on until it has, nor
    leaves before the others. Each rank taking it would serialize the ranks and deadlock their barriers."""
    with lock if ctx.rank == 0 else nullcontext():
        ctx.barrier()
        yield
        ctx.barrier()

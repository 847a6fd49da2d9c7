"""Writing a sharded store (sequences or a logit cache) from one process or several, resumably.

Every sharded stage has the same loop: open the writer (under torchrun rank 0 first and alone, since opening
may clear the leftovers of other settings), skip the shards a crashed attempt already published and those of
other ranks (shard i is rank i mod N's), write the rest, and publish once every rank has written its own.
`ranks` is anything with rank, world_size and barrier() (the pipeline's run context).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from .shards import read_manifest


class ShardedWrite:
    def __init__(self, ranks, open_writer: Callable[[int], object], num_shards: int):
        """`open_writer(rank)` opens this rank's writer on the store's hidden directory."""
        self.ranks, self.num_shards = ranks, num_shards
        writer = open_writer(0) if ranks.rank == 0 else None
        ranks.barrier()
        self.writer = writer or open_writer(ranks.rank)
        self.resumed = sum(self.writer.done(i) for i in range(num_shards))  # published by an earlier attempt

    def todo(self) -> Iterator[int]:
        """The shards this rank still has to write, in order."""
        for shard in range(self.num_shards):
            if shard % self.ranks.world_size == self.ranks.rank and not self.writer.done(shard):
                yield shard

    def write(self, shard: int, rows) -> None:
        self.writer.write_rows(shard, rows)

    def finish(self) -> dict:
        """Publish once every rank has written its shards; every rank gets the published manifest."""
        self.ranks.barrier()
        if self.ranks.rank == 0:
            self.writer.finish(self.num_shards)
        self.ranks.barrier()
        return read_manifest(Path(self.writer.final_dir))

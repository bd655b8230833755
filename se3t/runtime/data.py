"""Which molecules go into which micro-batch, on which rank, in which epoch.

The order of an epoch is a permutation drawn from ``(seed, epoch)`` alone, identical on every rank, so that

* a resumed run regenerates the epoch and skips exactly the micro-batches already consumed (no repeated
  epoch, unlike the reference), and
* each optimizer step covers the same molecules whatever the number of processes: a step takes the next
  ``batch_size * world_size * accumulate`` molecules of the permutation; each micro-step's global batch is
  split into contiguous per-rank chunks. Every rank knows the global molecule count of each step, so the loss
  can be normalised by it without communication: K processes with batch B give the gradients of 1 process
  with batch K*B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["MicroBatch", "EpochPlan", "even_chunks"]


def even_chunks(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges covering ``range(n)``, sizes differing by at most one."""
    base, extra = divmod(n, parts)
    bounds, start = [], 0
    for r in range(parts):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


@dataclass(frozen=True)
class MicroBatch:
    indices: list[int]      # this rank's molecules (indices into the data set)
    step: int               # optimizer step within the epoch this micro-batch belongs to
    last_of_step: bool      # gradients are all-reduced and the optimizer steps after this one
    step_molecules: int     # molecules of the whole optimizer step over all ranks (the loss normaliser)


class EpochPlan:
    """The micro-batches of one epoch for one rank.

    A tail shorter than one global micro-batch is split evenly over the ranks; it is dropped only when it
    has fewer molecules than ranks (so that no rank ever gets an empty batch).
    """

    def __init__(self, num_samples: int, batch_size: int, *, epoch: int, seed: int, rank: int = 0,
                 world_size: int = 1, accumulate: int = 1, shuffle: bool = True):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world_size, self.accumulate = rank, world_size, accumulate
        if shuffle:
            g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
            self.order = torch.randperm(num_samples, generator=g).tolist()
        else:
            self.order = list(range(num_samples))
        global_batch = batch_size * world_size
        micro: list[list[int]] = []  # global micro-batches
        for start in range(0, num_samples, global_batch):
            chunk = self.order[start:start + global_batch]
            if len(chunk) < world_size:
                break
            micro.append(chunk)
        self._micro = micro
        self.num_micro = len(micro)
        self.num_steps = -(-self.num_micro // accumulate)

    def micro_batches(self, start_step: int = 0):
        """This rank's micro-batches, starting at optimizer step ``start_step`` (for resuming mid-epoch)."""
        for step in range(start_step, self.num_steps):
            group = self._micro[step * self.accumulate:(step + 1) * self.accumulate]
            total = sum(len(m) for m in group)
            for i, chunk in enumerate(group):
                lo, hi = even_chunks(len(chunk), self.world_size)[self.rank]
                yield MicroBatch(chunk[lo:hi], step, i == len(group) - 1, total)

    def __len__(self) -> int:
        return self.num_steps

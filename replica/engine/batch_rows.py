"""Persistent batch rows: one row slot per running sequence, and the block tables kept in them.

A sequence gets a row (`Sequence.row`) when it enters the running batch (admission, resumption
after preemption, fork) and gives it back when it finishes or is preempted. Everything the
device keeps per sequence (block-table row, sampling parameters) lives at that row of
preallocated tensors and is written when it changes, not rebuilt each step: the scheduler says
what changed in the StepPlan (`new_rows`, `block_updates`), the runner and the sampler apply it.

Invariants:
- rows of running sequences are distinct and < capacity (the scheduler admits at most
  max_num_seqs running sequences, forks included);
- the lowest free row is handed out first, so the rows in use stay dense;
- a row handed out again is written in full (`block_updates` from index 0, `new_rows`) before
  any step reads it, so nothing of its previous owner leaks.
"""
import heapq

import numpy as np
import torch


class RowSlots:
    """Free row slots, lowest first. Owned by the scheduler."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._free = list(range(capacity))      # a heap

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self) -> int:
        if not self._free:
            raise RuntimeError(f"all {self.capacity} batch rows are in use: the scheduler must admit "
                               "at most max_num_seqs running sequences")
        return heapq.heappop(self._free)

    def give_back(self, row: int) -> None:
        heapq.heappush(self._free, row)


class PersistentBlockTable:
    """Block tables of the running sequences at their rows: [rows, max_blocks] int32 on the host
    (numpy; the host computes slot mappings from it) and on the device (the attention reads the
    scheduled rows from it). Owned by the model runner.

    `apply` writes a step's block-id changes into the host table and returns them as flat
    (index, value) pairs; the runner uploads those with the step's inputs and `scatter`s them into
    the device table in stream order, so a step still running on the device never sees the next
    step's writes and no host buffer is overwritten while a copy may still read it.
    """

    def __init__(self, num_rows: int, max_blocks: int, device: torch.device):
        self.max_blocks = max_blocks
        self.host = np.zeros((num_rows, max_blocks), dtype=np.int32)
        self.num_blocks = np.zeros(num_rows, dtype=np.int64)      # valid entries of each row
        self.device_table = torch.zeros(num_rows, max_blocks, dtype=torch.int32, device=device)

    def apply(self, updates: list[tuple[int, int, list[int]]]) -> tuple[np.ndarray, np.ndarray]:
        """updates: (row, first index, block ids to the end of the sequence's table) in plan
        order. Returns (flat indices int64, values int32), each
        index once, with its final value (a row may be written twice in one step)."""
        if not updates:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int32)
        width = self.max_blocks
        flat = []
        for row, start, ids in updates:
            end = start + len(ids)
            self.host[row, start:end] = ids
            self.num_blocks[row] = end              # each update runs to the table's end
            flat.append(np.arange(row * width + start, row * width + end, dtype=np.int64))
        index = np.unique(np.concatenate(flat))       # scatter with duplicate indices is racy on GPUs
        return index, self.host.reshape(-1)[index]

    def scatter(self, index: torch.Tensor, values: torch.Tensor) -> None:
        """Device side of `apply`: index [U] int64, values [U] int32, both on the device."""
        if len(index):
            self.device_table.view(-1).index_copy_(0, index, values)

    def rows(self, rows: torch.Tensor, width: int) -> torch.Tensor:
        """The scheduled rows' tables [len(rows), width] int32 (contiguous), gathered on the device."""
        return self.device_table[:, :width].index_select(0, rows)

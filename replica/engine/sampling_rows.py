"""Per-row sampling parameters of the persistent batch, kept on the host and on the device.

A sequence's parameters are written once, when it takes a batch row (`StepPlan.new_rows`); a
step then only names the rows it samples. Columns: temperature (1 for greedy rows, so dividing
by it is harmless), top_p, min_p, top_k (the vocabulary size when off), is_greedy (1 or 0).

Writes reach the device through pinned host buffers used in turn (two steps may be in flight)
and one scatter in stream order, so a step still running on the device reads its own values.
"""
import numpy as np
import torch

from replica.sampling_params import SamplingParams

_RING = 2
NUM_COLUMNS = 5
TEMPERATURE, TOP_P, MIN_P, TOP_K, IS_GREEDY = range(NUM_COLUMNS)


class RowParams:
    def __init__(self, num_rows: int, vocab_size: int, device: torch.device):
        self.vocab_size = vocab_size
        self.device = device
        self.is_cuda = device.type == "cuda"
        self.num_rows = 0
        self.host = np.zeros((0, NUM_COLUMNS), dtype=np.float32)
        self.grow(num_rows)

    def grow(self, num_rows: int) -> None:
        """Room for `num_rows` rows, keeping the rows written so far (waits for the device: rare)."""
        if num_rows <= self.num_rows:
            return
        if self.is_cuda:
            torch.cuda.synchronize()            # the old staging buffers may still be in a copy
        host = np.zeros((num_rows, NUM_COLUMNS), dtype=np.float32)
        host[:self.num_rows] = self.host
        self.host, self.num_rows = host, num_rows
        self.device_table = torch.tensor(host, device=self.device)       # a copy, on the CPU too
        pin = self.is_cuda
        # staging: rows written [U] then rows sampled [S] (int64), and the written values [U, C]
        self._index = [torch.zeros(2 * num_rows, dtype=torch.int64, pin_memory=pin) for _ in range(_RING)]
        self._values = [torch.zeros(num_rows, NUM_COLUMNS, pin_memory=pin) for _ in range(_RING)]
        self._slot = 0

    def update(self, new_rows: list[tuple[int, SamplingParams]], rows: np.ndarray) -> torch.Tensor | None:
        """Writes the parameters of rows that changed owner; returns `rows` on the device when
        any of them samples at random (the sampler gathers their parameters), else None (all
        greedy: nothing to gather). No host sync."""
        slot, self._slot = self._slot, self._slot + 1
        index, values = self._index[slot % _RING], self._values[slot % _RING]
        num_new = 0
        if new_rows:
            for row, p in new_rows:
                self.host[row] = (p.temperature or 1.0, p.top_p, p.min_p, p.top_k or self.vocab_size,
                                  1.0 if p.is_greedy else 0.0)
            written = np.unique(np.fromiter((row for row, _ in new_rows), dtype=np.int64, count=len(new_rows)))
            num_new = len(written)
            index.numpy()[:num_new] = written
            values.numpy()[:num_new] = self.host[written]
        need_rows = len(rows) > 0 and not self.host[rows, IS_GREEDY].all()
        num_index = num_new + (len(rows) if need_rows else 0)
        if need_rows:
            index.numpy()[num_new:num_index] = rows
        if num_index == 0:
            return None
        device_index = index[:num_index].to(self.device, non_blocking=self.is_cuda)
        if num_new:
            device_values = values[:num_new].to(self.device, non_blocking=self.is_cuda)
            self.device_table.index_copy_(0, device_index[:num_new], device_values)
        return device_index[num_new:] if need_rows else None

    def gather(self, device_rows: torch.Tensor) -> torch.Tensor:
        """[NUM_COLUMNS, S] parameters of the sampled rows, on the device."""
        return self.device_table.index_select(0, device_rows).T

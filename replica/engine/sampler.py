"""Sampling for a whole batch on the device, from per-row parameter tensors.

Order, as transformers and vLLM apply it: penalties and min_tokens masking on the raw logits,
then greedy rows take the argmax; the others are divided by their temperature, cut by top-k,
top-p and min-p, and sampled. Sampling uses the exponential race (argmax of p / E with
E ~ Exp(1)), which draws from p; a seeded request draws E from its own generator, so its tokens
do not depend on which other requests share the batch. Reported logprobs are those of the raw
model distribution (before penalties and temperature), as vLLM reports them.

Per-row parameters live at the sequences' persistent batch rows (`sampling_rows.py`): written
once when a sequence takes its row, gathered on the device for the rows a step samples.

`sample_async` launches everything and returns a `SampledBatch` without waiting for the device: the
token ids stay on the device for the next step's inputs (overlap scheduling) while a copy to
pinned host memory runs; `SampledBatch.to_host()` waits for that copy alone. On CUDA that copy
runs on a stream of its own, so the next step's kernels need not wait behind it (a device-to-host
copy and its hand-over to the copy engine are ~10 µs of a batch-1 step, bench/NOTES.md, "What a
W2 step spends outside the layers"). Per-sequence
Python runs only for rows that ask for penalties, min_tokens or a seed.
"""
from dataclasses import dataclass

import numpy as np
import torch

from replica.engine.sampling_rows import IS_GREEDY, MIN_P, TOP_K, TOP_P, RowParams
from replica.engine.sequence import Sequence
from replica.engine.structured_output import AllowedMask
from replica.kernels import ops
from replica.outputs import TokenLogprob

_RING = 2     # host buffers in flight: a step's copy is read before the step after next reuses it
# CUDA: the sampled tokens' copy to the host on a stream of its own (above). False: on the
# compute stream, behind which the next step's kernels wait (A/B).
COPY_STREAM = True


@dataclass
class SampledBatch:
    tokens: torch.Tensor                    # [S] int64 on the device: next step's inputs read it
    host_tokens: torch.Tensor               # [S] int64 on the host, filled by an async copy
    ready: torch.cuda.Event | None          # recorded after the copies; None on the CPU
    logprob_rows: list[int]                 # rows that asked for logprobs
    num_top: list[int]                      # alternatives each of those rows asked for
    logprob_tensors: tuple | None = None    # host (chosen [L], top values [L, K], top ids [L, K])

    def to_host(self) -> tuple[list[int], list[TokenLogprob | None]]:
        if self.ready is not None:
            self.ready.synchronize()
        tokens = self.host_tokens.tolist()
        logprobs: list[TokenLogprob | None] = [None] * len(tokens)
        if self.logprob_tensors is not None:
            chosen, top_values, top_ids = (t.tolist() for t in self.logprob_tensors)
            for j, (row, num_top) in enumerate(zip(self.logprob_rows, self.num_top)):
                top = list(zip(top_ids[j][:num_top], top_values[j][:num_top]))
                logprobs[row] = TokenLogprob(tokens[row], chosen[j], top)
        return tokens, logprobs


class Sampler:
    def __init__(self, vocab_size: int, eos_token_ids: list[int], seed: int, device: torch.device,
                 max_num_rows: int = 1024):
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.is_cuda = device.type == "cuda"
        self._step = 0
        self.row_params = RowParams(max_num_rows, vocab_size, device)
        self._copy_stream = torch.cuda.Stream(device) if self.is_cuda else None
        self._allocate(max_num_rows)

    def _allocate(self, num_rows: int) -> None:
        """Host buffers, allocated (pinned on CUDA) once: pinning per step costs more than the copy."""
        self._max_rows = num_rows
        self._tokens = [torch.zeros(num_rows, dtype=torch.int64, pin_memory=self.is_cuda) for _ in range(_RING)]

    def sample(self, logits: torch.Tensor, seqs: list[Sequence], allowed_mask: AllowedMask | None = None
               ) -> tuple[list[int], list[TokenLogprob | None]]:
        """Samples and waits: (token ids, logprobs or None per row)."""
        return self.sample_async(logits, seqs, allowed_mask).to_host()

    def sample_async(self, logits: torch.Tensor, seqs: list[Sequence], allowed_mask: AllowedMask | None = None,
                     rows: np.ndarray | None = None, new_rows: list | None = None) -> SampledBatch:
        # logits: [S, V] float32, one row per sequence in `seqs`; the runner's fresh tensor,
        # which a grammar's mask overwrites in place (no copy of S x V floats per step)
        # allowed_mask: structured outputs' grammars, applied to their rows only
        # rows: each sequence's persistent batch row; new_rows: (row, params) of the rows that
        # changed owner since the last call (StepPlan.new_rows). Without rows (a batch of its
        # own, e.g. tests), rows 0..S-1 are written afresh.
        num_rows = len(seqs)
        if rows is None:
            rows = np.arange(num_rows)
            new_rows = [(i, s.params) for i, s in enumerate(seqs)]
        if num_rows > self._max_rows:
            if self.is_cuda:
                torch.cuda.synchronize()        # the old buffers may still be in a copy
            self._allocate(num_rows)
        self.row_params.grow(int(rows.max()) + 1 if num_rows else 0)
        slot = self._step % _RING
        self._step += 1
        params = [s.params for s in seqs]
        device_rows = self.row_params.update(new_rows, rows)
        logprob_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
        raw_logprobs = (torch.log_softmax(logits.index_select(0, self._rows(logprob_rows)), dim=-1)
                        if logprob_rows else None)
        if allowed_mask is not None:      # structured outputs: forbidden tokens → -inf
            allowed_mask.apply(logits)
        logits = self._apply_penalties(logits, seqs)
        tokens = ops.argmax(logits)
        if device_rows is not None:         # some rows sample at random
            tokens = self._sample_random(logits, seqs, tokens, self.row_params.host[rows], device_rows)
        host_tokens = self._tokens[slot][:num_rows]
        if self.is_cuda and raw_logprobs is None and COPY_STREAM:    # on its own stream, after the tokens
            sampled = torch.cuda.Event()
            sampled.record()
            self._copy_stream.wait_event(sampled)
            with torch.cuda.stream(self._copy_stream):
                host_tokens.copy_(tokens, non_blocking=True)
            tokens.record_stream(self._copy_stream)     # not reused before the copy has read it
            ready = torch.cuda.Event()
            ready.record(self._copy_stream)
            return SampledBatch(tokens, host_tokens, ready, [], [])
        host_tokens.copy_(tokens, non_blocking=self.is_cuda)
        batch = SampledBatch(tokens, host_tokens, None, logprob_rows,
                             [params[i].logprobs for i in logprob_rows])
        if raw_logprobs is not None:
            num_top = max(max(batch.num_top), 1)
            chosen = raw_logprobs.gather(1, tokens.index_select(0, self._rows(logprob_rows))[:, None])[:, 0]
            top_values, top_ids = raw_logprobs.topk(num_top, dim=-1)
            batch.logprob_tensors = tuple(t.to("cpu", non_blocking=self.is_cuda)
                                          for t in (chosen, top_values, top_ids))
        if self.is_cuda:
            batch.ready = torch.cuda.Event()
            batch.ready.record()
        return batch

    def _rows(self, rows: list[int]) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.long).to(self.device, non_blocking=True)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        needs = [i for i, s in enumerate(seqs)
                 if s.params.has_penalties or s.num_output_tokens < s.params.min_tokens]
        if not needs:
            return logits
        logits = logits.clone()
        for i in needs:
            seq, p, row = seqs[i], seqs[i].params, logits[i]
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long).to(row.device)
                values = row[seen]
                row[seen] = torch.where(values > 0, values / p.repetition_penalty,
                                        values * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
                out = torch.tensor(seq.output_token_ids, dtype=torch.long).to(row.device)
                counts = torch.bincount(out, minlength=row.shape[0]).to(row.dtype)
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
            if seq.num_output_tokens < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
                if banned:
                    row[torch.tensor(sorted(banned)).to(row.device)] = float("-inf")
        return logits

    def _sample_random(self, logits: torch.Tensor, seqs: list[Sequence], greedy: torch.Tensor,
                       host_params: np.ndarray, device_rows: torch.Tensor) -> torch.Tensor:
        # host_params: [S, columns] the rows' parameters on the host, for the flags below
        temperature, top_p, min_p, top_k, is_greedy = self.row_params.gather(device_rows)
        logits = logits / temperature[:, None]
        if (host_params[:, TOP_K] < self.vocab_size).any() or (host_params[:, TOP_P] < 1.0).any():
            logits = apply_top_k_top_p(logits, top_k, top_p)
        probs = torch.softmax(logits, dim=-1)
        if (host_params[:, MIN_P] > 0).any():
            probs = apply_min_p(probs, min_p)
        noise = torch.empty_like(probs).exponential_(generator=self.generator)
        for i, s in enumerate(seqs):
            if s.generator is not None:
                noise[i].exponential_(generator=s.generator)
        noise.clamp_(min=1e-30)         # a zero draw would turn a masked 0/0 into NaN
        sampled = (probs / noise).argmax(dim=-1)
        if not host_params[:, IS_GREEDY].any():
            return sampled
        return torch.where(is_greedy > 0, greedy, sampled)


def _as_tensor(values, like: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.to(device=like.device, dtype=dtype)
    return torch.tensor(values, device=like.device, dtype=dtype)


def apply_top_k_top_p(logits: torch.Tensor, top_k, top_p) -> torch.Tensor:
    """Masks (to -inf) every token outside each row's top-k and top-p nucleus. top_k: [S] (0 or
    >= vocab: off), top_p: [S], as lists or tensors."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    vocab = logits.shape[1]
    k = _as_tensor(top_k, logits, torch.long)
    k = torch.where(k > 0, k, vocab)
    ranks = torch.arange(vocab, device=logits.device)
    remove = ranks[None, :] >= k[:, None]
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    p = _as_tensor(top_p, logits, logits.dtype)
    probs = torch.softmax(sorted_logits, dim=-1)
    # drop a token when the tokens before it already reach top_p (the first token always stays)
    before = probs.cumsum(dim=-1) - probs
    # top_p == 1 keeps everything: `before` can round up to 1.0 far below float32 resolution
    sorted_logits = sorted_logits.masked_fill((before >= p[:, None]) & (p[:, None] < 1.0), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)


def apply_min_p(probs: torch.Tensor, min_p) -> torch.Tensor:
    threshold = _as_tensor(min_p, probs, probs.dtype)[:, None] * probs.max(dim=-1, keepdim=True).values
    probs = probs.masked_fill(probs < threshold, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)

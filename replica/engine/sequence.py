"""One generation stream: its tokens, its KV blocks and where it stands.

A request with n > 1 samples is one `Sequence` until its prompt is computed, then forks into n
sequences that share the prompt's blocks (see BlockManager.fork).
"""
import itertools
from enum import IntEnum

import torch

from replica.sampling_params import SamplingParams


class SequenceStatus(IntEnum):
    # Order means something: every status above RUNNING is finished. Only the scheduler sets it.
    WAITING = 0           # queued (new or preempted); holds no blocks
    RUNNING = 1           # holds blocks; scheduled every step it fits the token budget
    FINISHED_STOPPED = 2  # EOS, a stop token id or a stop string
    FINISHED_LENGTH = 3   # max_tokens or the context length
    FINISHED_ABORTED = 4  # the client went away or asked to stop

    @property
    def is_finished(self) -> bool:
        return self > SequenceStatus.RUNNING

    @property
    def finish_reason(self) -> str | None:
        return {2: "stop", 3: "length", 4: "abort"}.get(int(self))


_seq_ids = itertools.count()

# Stands in a sequence's token ids for a token the device has sampled but the host has not read
# yet (overlap scheduling); the next step's input for it comes from the device.
PLACEHOLDER_TOKEN = -1


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_s: float, index: int = 0):
        self.seq_id = next(_seq_ids)
        self.request_id = request_id
        self.index = index                    # sample index within the request
        self.params = params
        self.arrival_s = arrival_s
        self.token_ids = list(prompt_token_ids)   # prompt then output
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0          # tokens whose K/V are in the cache
        self.num_cached_tokens = 0            # prompt tokens found in the prefix cache
        self.block_table: list[int] = []      # owned by the BlockManager
        self.block_hashes: list[int] = []     # chained hashes of full blocks, filled lazily
        # leading blocks of block_table already offered to the prefix cache (BlockManager)
        self.num_registered_blocks = 0
        self.row = -1                         # persistent batch row while running (batch_rows.py)
        self.status = SequenceStatus.WAITING
        self.num_pending_forks = params.n - 1 if index == 0 else 0
        self.generator: torch.Generator | None = None
        self.stop_reason: str | int | None = None
        # Trailing PLACEHOLDER_TOKENs in token_ids: sampled on the device, not yet read (0 to 2).
        self.num_placeholders = 0
        # What the core has reported to its front end (EngineCore._collect).
        self.num_reported_tokens = 0
        self.new_logprobs: list = []          # TokenLogprob of tokens not yet reported
        self.is_reported_finished = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id}#{self.index}, {self.status.name}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens})")

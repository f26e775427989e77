"""Continuous batching with chunked prefill, FCFS admission and preemption by recompute.

Each step spends a token budget (`max_num_batched_tokens`): first on the running sequences in
admission order (a decode costs one token, an unfinished prefill continues with the next chunk),
then on admitting waiting sequences from the head of the queue. When a running sequence needs a
block and none is free, the most recently admitted running sequence is preempted: its blocks are
freed and it goes back to the head of the waiting queue, to be recomputed (prefix caching often
gives its blocks back). Admission stops at the first waiting sequence that does not fit, so later
arrivals never overtake it.
"""
from collections import deque
from dataclasses import dataclass, field

from replica.engine.batch_rows import RowSlots
from replica.engine.block_manager import BlockManager
from replica.engine.sequence import Sequence, SequenceStatus
from replica.sampling_params import SamplingParams


@dataclass
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int     # tokens computed this step, starting at seq.num_computed_tokens


@dataclass
class StepPlan:
    """What runs this step; the one object the scheduler hands to the model runner."""
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    # sequences that sample a token this step, and the `scheduled` entry whose last token's
    # logits they sample from (a forked sample reads its parent's row)
    samplers: list[tuple[Sequence, int]] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)   # (src, dst), run first
    forks: list[tuple[Sequence, Sequence]] = field(default_factory=list)  # (parent, child)
    # Persistent batch rows (batch_rows.py): sequences that took a row this step, with their
    # sampling parameters, and block-table changes as (row, first index, the table from there on),
    # in the order they happened; the runner never reads the block manager.
    new_rows: list[tuple[int, SamplingParams]] = field(default_factory=list)
    block_updates: list[tuple[int, int, list[int]]] = field(default_factory=list)
    num_batched_tokens: int = 0

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.rows = RowSlots(max_num_seqs)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ----------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        bm = self.block_manager
        preempted = False
        # Samples forked this step join `running` only after the step is planned: they have
        # nothing to compute now (they sample from their parent's row) and must not be scheduled
        # or preempted before they exist.
        self._forked: list[Sequence] = []
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not bm.can_append(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break                   # it was the last running sequence and is now waiting
            self._append_slots(plan, seq, num_new)
            self._add_to_plan(plan, seq, num_new)
            budget -= num_new
            index += 1

        while self.waiting and budget > 0 and not preempted:
            seq = self.waiting[0]
            reserved = sum(s.num_pending_forks for s in self.running) + len(self._forked)
            if len(self.running) + reserved + 1 + seq.num_pending_forks > self.max_num_seqs:
                break
            cached = bm.find_cached_prefix(seq)
            num_new = min(seq.num_tokens - len(cached) * bm.block_size, budget)
            if not bm.can_admit(seq, cached, num_new):
                break
            self.waiting.popleft()
            bm.admit(seq, cached)
            self._take_row(plan, seq)
            self._append_slots(plan, seq, num_new, first_index=0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            self._add_to_plan(plan, seq, num_new)
            budget -= num_new
        self.running.extend(self._forked)
        plan.num_batched_tokens = self.max_num_batched_tokens - budget
        return plan

    def _take_row(self, plan: StepPlan, seq: Sequence) -> None:
        seq.row = self.rows.take()
        plan.new_rows.append((seq.row, seq.params))

    def _give_back_row(self, seq: Sequence) -> None:
        if seq.row >= 0:
            self.rows.give_back(seq.row)
            seq.row = -1

    def _append_slots(self, plan: StepPlan, seq: Sequence, num_new: int, first_index: int | None = None) -> None:
        """Blocks for `num_new` more tokens; the table's changes from `first_index` (by default
        the first new or copied-on-write block) go into the plan for the sequence's row."""
        start = len(seq.block_table) if first_index is None else first_index
        copies = self.block_manager.append_slots(seq, num_new)
        if copies:                  # copy-on-write replaced the block being filled
            start = min(start, seq.num_computed_tokens // self.block_manager.block_size)
        plan.block_copies += copies
        if start < len(seq.block_table):
            plan.block_updates.append((seq.row, start, seq.block_table[start:]))

    def _add_to_plan(self, plan: StepPlan, seq: Sequence, num_new: int) -> None:
        entry = len(plan.scheduled)
        plan.scheduled.append(ScheduledSeq(seq, num_new))
        if seq.num_computed_tokens + num_new < seq.num_tokens:
            return                      # a prefill chunk that is not the last one
        plan.samplers.append((seq, entry))
        for i in range(seq.num_pending_forks):
            child = Sequence(seq.request_id, seq.token_ids, seq.params, seq.arrival_s,
                             index=seq.index + 1 + i)
            self.block_manager.fork(seq, child)
            self._take_row(plan, child)
            plan.block_updates.append((child.row, 0, list(child.block_table)))
            child.status = SequenceStatus.RUNNING
            child.num_cached_tokens = seq.num_cached_tokens
            self._forked.append(child)
            plan.forks.append((seq, child))
            plan.samplers.append((child, entry))
        seq.num_pending_forks = 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        self._give_back_row(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish_step(self, plan: StepPlan, cache_blocks: bool = True) -> None:
        """After the forward is launched: the scheduled tokens are (or will be, in stream order)
        in the cache. With overlap scheduling the engine registers full blocks for prefix
        caching later (`cache_blocks=False`), once every computed token's id is known."""
        for entry in plan.scheduled:
            entry.seq.num_computed_tokens += entry.num_new_tokens
        for parent, child in plan.forks:
            child.num_computed_tokens = parent.num_computed_tokens
        if cache_blocks:
            self.cache_blocks(plan)

    def cache_blocks(self, plan: StepPlan) -> None:
        for entry in plan.scheduled:
            self.block_manager.cache_full_blocks(entry.seq)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """End a sequence (stop, length or abort) and free its blocks."""
        if seq.status.is_finished:
            return
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
            self._give_back_row(seq)
        else:
            self.waiting.remove(seq)
        seq.status = status
        seq.num_pending_forks = 0
        self.block_manager.free(seq)

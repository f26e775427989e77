"""Scheduler: token budget, chunked prefill mixed with decodes, max_num_seqs, FCFS admission,
preemption order, n > 1 forks; and no starvation through the real engine under sustained load.

The unit tests drive a Scheduler over a real BlockManager without a model: `run_step` does what
the engine does after the forward (finish_step, then one sampled token per sampler).
"""
import itertools
import random


from replica.config import EngineConfig
from replica.engine.block_manager import BlockManager
from replica.engine.engine import LLMEngine
from replica.engine.scheduler import Scheduler, StepPlan
from replica.engine.sequence import Sequence, SequenceStatus
from replica.sampling_params import SamplingParams

from .conftest import assert_pool_free

BLOCK_SIZE = 4
_prompt_starts = itertools.count(1000, 1000)


def make_seq(name: str, num_tokens: int, n: int = 1, max_tokens: int = 16) -> Sequence:
    first = next(_prompt_starts)        # every prompt distinct: no accidental prefix-cache hits
    return Sequence(name, list(range(first, first + num_tokens)), SamplingParams(n=n, max_tokens=max_tokens),
                    arrival_s=0.0)


def run_step(scheduler: Scheduler, plan: StepPlan, token_id: int = 7) -> None:
    scheduler.finish_step(plan)
    for seq, _ in plan.samplers:
        seq.token_ids.append(token_id)


def scheduled(plan: StepPlan) -> list[tuple[str, int]]:
    return [(f"{e.seq.request_id}#{e.seq.index}", e.num_new_tokens) for e in plan.scheduled]


def samplers(plan: StepPlan) -> list[str]:
    return [f"{seq.request_id}#{seq.index}" for seq, _ in plan.samplers]


def test_long_prompt_is_chunked_to_the_budget_and_mixed_with_decodes():
    scheduler = Scheduler(BlockManager(64, BLOCK_SIZE), max_num_seqs=8, max_num_batched_tokens=8)
    scheduler.add(make_seq("d", 3))
    plan = scheduler.schedule()
    assert scheduled(plan) == [("d#0", 3)]
    run_step(scheduler, plan)

    scheduler.add(make_seq("long", 20))
    chunks = []
    for _ in range(4):
        plan = scheduler.schedule()
        chunks.append((scheduled(plan), samplers(plan), plan.num_batched_tokens))
        run_step(scheduler, plan)
    assert chunks == [
        ([("d#0", 1), ("long#0", 7)], ["d#0"], 8),               # the decode first, then a chunk
        ([("d#0", 1), ("long#0", 7)], ["d#0"], 8),
        ([("d#0", 1), ("long#0", 6)], ["d#0", "long#0"], 7),     # last chunk: long samples
        ([("d#0", 1), ("long#0", 1)], ["d#0", "long#0"], 2),     # both decode
    ]


def test_max_num_seqs_caps_the_running_set():
    scheduler = Scheduler(BlockManager(64, BLOCK_SIZE), max_num_seqs=2, max_num_batched_tokens=64)
    a, b, c = make_seq("a", 3), make_seq("b", 3), make_seq("c", 3)
    for seq in (a, b, c):
        scheduler.add(seq)
    plan = scheduler.schedule()
    assert scheduled(plan) == [("a#0", 3), ("b#0", 3)]
    run_step(scheduler, plan)
    plan = scheduler.schedule()
    assert scheduled(plan) == [("a#0", 1), ("b#0", 1)]
    assert list(scheduler.waiting) == [c]
    run_step(scheduler, plan)

    scheduler.finish(a, SequenceStatus.FINISHED_LENGTH)
    plan = scheduler.schedule()
    assert scheduled(plan) == [("b#0", 1), ("c#0", 3)]
    run_step(scheduler, plan)
    for seq in (b, c):
        scheduler.finish(seq, SequenceStatus.FINISHED_LENGTH)
    assert scheduler.block_manager.num_free_blocks == 64


def test_preemption_evicts_the_most_recently_admitted_and_requeues_it_at_the_head():
    bm = BlockManager(6, BLOCK_SIZE, enable_prefix_caching=False)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c = make_seq("a", 7), make_seq("b", 7), make_seq("c", 7)     # 2 blocks each: pool full
    for seq in (a, b, c):
        scheduler.add(seq)
    for _ in range(2):              # the prefill, then one decode: 9 tokens, 8 in the cache
        run_step(scheduler, scheduler.schedule())
    assert (a.block_table, b.block_table, c.block_table) == ([0, 1], [2, 3], [4, 5])

    d = make_seq("d", 3)
    scheduler.add(d)
    plan = scheduler.schedule()     # a and b each need a third block; none is free
    assert c.status == SequenceStatus.WAITING
    assert c.block_table == [] and c.num_computed_tokens == 0
    assert list(scheduler.waiting) == [c, d]       # c goes back ahead of the later arrival
    assert scheduler.num_preemptions == 1
    assert scheduled(plan) == [("a#0", 1), ("b#0", 1)]    # no admission in a step that preempted
    assert (a.block_table, b.block_table) == ([0, 1, 4], [2, 3, 5])
    run_step(scheduler, plan)

    for seq in (a, b):
        scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
    plan = scheduler.schedule()     # c is recomputed: its prompt and its 2 output tokens
    assert scheduled(plan) == [("c#0", 9), ("d#0", 3)]
    run_step(scheduler, plan)
    for seq in (c, d):
        scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
    assert bm.num_free_blocks == bm.num_blocks


def test_the_newest_running_sequence_preempts_itself_when_it_cannot_grow():
    bm = BlockManager(4, BLOCK_SIZE, enable_prefix_caching=False)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b = make_seq("a", 7), make_seq("b", 8)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler, scheduler.schedule())      # a: 8 tokens, 7 cached; b: 9 tokens, 8 cached
    plan = scheduler.schedule()     # a's decode fits its blocks; b needs a fifth block
    assert scheduled(plan) == [("a#0", 1)]
    assert list(scheduler.waiting) == [b] and b.block_table == []
    assert a.block_table == [0, 1]
    run_step(scheduler, plan)
    scheduler.finish(a, SequenceStatus.FINISHED_STOPPED)
    scheduler.finish(b, SequenceStatus.FINISHED_ABORTED)
    assert bm.num_free_blocks == bm.num_blocks


def test_fcfs_a_waiting_sequence_that_does_not_fit_blocks_later_ones():
    bm = BlockManager(4, BLOCK_SIZE, enable_prefix_caching=False)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a = make_seq("a", 7)
    scheduler.add(a)
    run_step(scheduler, scheduler.schedule())      # a holds 2 of the 4 blocks
    big, small = make_seq("big", 12), make_seq("small", 3)     # 3 blocks, 1 block
    scheduler.add(big)
    scheduler.add(small)
    for _ in range(2):
        plan = scheduler.schedule()
        assert scheduled(plan) == [("a#0", 1)], "small must not overtake big"
        assert list(scheduler.waiting) == [big, small]
        run_step(scheduler, plan)
    scheduler.finish(a, SequenceStatus.FINISHED_STOPPED)
    plan = scheduler.schedule()
    assert scheduled(plan) == [("big#0", 12), ("small#0", 3)]
    run_step(scheduler, plan)
    for seq in (big, small):
        scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
    assert bm.num_free_blocks == bm.num_blocks


def test_n_samples_fork_after_the_prompt_and_share_its_blocks():
    bm = BlockManager(16, BLOCK_SIZE)
    scheduler = Scheduler(bm, max_num_seqs=3, max_num_batched_tokens=64)
    a = make_seq("a", 6, n=3)
    other = make_seq("other", 2)
    scheduler.add(a)
    scheduler.add(other)
    plan = scheduler.schedule()
    assert scheduled(plan) == [("a#0", 6)], "the two future samples of a count against max_num_seqs"
    assert samplers(plan) == ["a#0", "a#1", "a#2"]      # all three sample from a's prompt logits
    children = [child for _, child in plan.forks]
    assert [c.index for c in children] == [1, 2]
    assert all(c.block_table == a.block_table == [0, 1] for c in children)
    assert [bm.blocks[b].ref_count for b in (0, 1)] == [3, 3]
    scheduler.finish_step(plan)
    for token_id, (seq, _) in enumerate(plan.samplers):
        seq.token_ids.append(50 + token_id)        # each sample draws its own token

    plan = scheduler.schedule()     # each writes position 6, inside the shared block 1
    assert scheduled(plan) == [("a#0", 1), ("a#1", 1), ("a#2", 1)]
    assert plan.block_copies == [(1, 2), (1, 3)]    # the last owner of block 1 writes in place
    assert [s.block_table for s in [a] + children] == [[0, 2], [0, 3], [0, 1]]
    assert bm.blocks[0].ref_count == 3
    run_step(scheduler, plan)
    for seq in [a] + children:
        scheduler.finish(seq, SequenceStatus.FINISHED_LENGTH)
    plan = scheduler.schedule()
    assert scheduled(plan) == [("other#0", 2)]
    run_step(scheduler, plan)
    scheduler.finish(other, SequenceStatus.FINISHED_LENGTH)
    assert bm.num_free_blocks == bm.num_blocks


def test_samples_forked_after_a_chunked_prompt_are_not_scheduled_again_in_the_same_step():
    scheduler = Scheduler(BlockManager(64, BLOCK_SIZE), max_num_seqs=8, max_num_batched_tokens=32)
    x, a = make_seq("x", 28), make_seq("a", 10, n=2)
    scheduler.add(x)
    scheduler.add(a)
    plan = scheduler.schedule()
    assert scheduled(plan) == [("x#0", 28), ("a#0", 4)]
    run_step(scheduler, plan)
    plan = scheduler.schedule()     # a's last chunk: a#1 forks and samples from a's row
    assert samplers(plan) == ["x#0", "a#0", "a#1"]
    assert scheduled(plan) == [("x#0", 1), ("a#0", 6)]


def test_random_load_respects_budget_and_max_num_seqs_and_finishes_everything():
    rng = random.Random(0)
    budget, max_num_seqs = 16, 6
    bm = BlockManager(24, BLOCK_SIZE)
    scheduler = Scheduler(bm, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget)
    seqs, finished = [], set()
    shared_prefix = list(range(500, 508))
    for step in range(2000):
        if step < 120 and rng.random() < 0.5:
            tail = [rng.randrange(600, 900) for _ in range(rng.randrange(1, 30))]
            prompt = (shared_prefix if rng.random() < 0.5 else []) + tail
            seq = Sequence(f"r{len(seqs)}", prompt, SamplingParams(max_tokens=rng.randrange(1, 20)), 0.0)
            seqs.append(seq)
            scheduler.add(seq)
        if not scheduler.has_unfinished:
            if step >= 120:
                break
            continue
        plan = scheduler.schedule()
        assert plan.num_batched_tokens == sum(e.num_new_tokens for e in plan.scheduled) <= budget
        assert len(scheduler.running) <= max_num_seqs
        assert len({id(e.seq) for e in plan.scheduled}) == len(plan.scheduled)
        for e in plan.scheduled:
            covered = len(e.seq.block_table) * BLOCK_SIZE
            assert e.seq.num_computed_tokens + e.num_new_tokens <= covered
        held = sum(b.ref_count > 0 for b in bm.blocks)
        assert held + bm.num_free_blocks == bm.num_blocks
        run_step(scheduler, plan, token_id=rng.randrange(600, 900))
        for seq, _ in plan.samplers:
            if seq.num_output_tokens >= seq.params.max_tokens:
                scheduler.finish(seq, SequenceStatus.FINISHED_LENGTH)
                finished.add(seq.request_id)
    assert finished == {s.request_id for s in seqs}, "every request finishes"
    assert scheduler.num_preemptions > 0, "the pool must be tight enough to preempt"
    assert bm.num_prefix_hits > 0, "the shared prefix must be hit"
    assert bm.num_free_blocks == bm.num_blocks


def test_no_starvation_under_sustained_load_through_the_engine(token_model_path):
    # 16 blocks of 4 = 64 tokens of KV (one full-length sequence) for up to 8 sequences.
    engine = LLMEngine(EngineConfig(model=str(token_model_path), dtype="float32", block_size=4, num_kv_blocks=16,
                                    max_model_len=64, max_num_batched_tokens=16, max_num_seqs=8))
    rng = random.Random(1)
    plans = []
    schedule = engine.scheduler.schedule

    def recording_schedule():
        plan = schedule()
        plans.append(plan.num_batched_tokens)
        return plan

    engine.scheduler.schedule = recording_schedule
    expected_lengths, got = {}, {}
    step = 0
    while step < 40 or engine.has_unfinished:
        if step < 40 and step % 2 == 0:      # a new request every other step for 40 steps
            request_id = str(len(expected_lengths))
            max_tokens = rng.randrange(4, 16)
            prompt = [rng.randrange(3, 512) for _ in range(rng.randrange(1, 32))]
            engine.add_request(request_id, prompt,
                               SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
            expected_lengths[request_id] = max_tokens
        for out in engine.step():
            got.setdefault(out.request_id, []).extend(out.outputs[0].new_token_ids)
            if out.finished:
                assert out.outputs[0].finish_reason == "length"
        step += 1
        assert step < 1000, "the engine must drain"
    assert {r: len(t) for r, t in got.items()} == expected_lengths
    assert engine.scheduler.num_preemptions > 0
    assert max(plans) <= 16
    assert_pool_free(engine)

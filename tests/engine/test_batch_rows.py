"""Persistent batch rows: a running sequence holds one row from admission (or fork) until it
finishes or is preempted; the plan carries what changed (new rows, new block ids), and the
runner's persistent block table, on the host and on the device, equals the block manager's
tables after every step of a mixed run (chunked prefill, preemption, forks, prefix hits,
overlap, aborts).
"""
import random

import numpy as np

from replica.config import EngineConfig
from replica.engine.block_manager import BlockManager
from replica.engine.engine import LLMEngine
from replica.engine.scheduler import Scheduler
from replica.engine.sequence import SequenceStatus
from replica.sampling_params import SamplingParams

from .conftest import assert_pool_free
from .test_scheduler import BLOCK_SIZE, make_seq, run_step


def test_a_row_is_taken_at_admission_and_reused_after_a_finish():
    bm = BlockManager(16, BLOCK_SIZE, enable_prefix_caching=False)
    scheduler = Scheduler(bm, max_num_seqs=4, max_num_batched_tokens=64)
    a, b = make_seq("a", 6), make_seq("b", 3)
    scheduler.add(a)
    scheduler.add(b)
    plan = scheduler.schedule()
    assert (a.row, b.row) == (0, 1)
    assert plan.new_rows == [(0, a.params), (1, b.params)]
    assert plan.block_updates == [(0, 0, a.block_table), (1, 0, b.block_table)]
    run_step(scheduler, plan)
    plan = scheduler.schedule()         # decodes within their blocks: nothing to write
    assert plan.new_rows == [] and plan.block_updates == []
    run_step(scheduler, plan)

    scheduler.finish(a, SequenceStatus.FINISHED_STOPPED)
    assert a.row == -1 and scheduler.rows.num_free == 3
    c = make_seq("c", 5)
    scheduler.add(c)
    plan = scheduler.schedule()         # b's 6th token opens its second block; c takes row 0
    assert c.row == 0
    assert plan.new_rows == [(0, c.params)]
    assert plan.block_updates == [(1, 1, b.block_table[1:]), (0, 0, c.block_table)]
    run_step(scheduler, plan)
    for seq in (b, c):
        scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
    assert scheduler.rows.num_free == 4 and bm.num_free_blocks == bm.num_blocks


def test_a_preempted_sequence_gives_its_row_back_and_gets_one_on_resume():
    bm = BlockManager(6, BLOCK_SIZE, enable_prefix_caching=False)
    scheduler = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=64)
    a, b, c = make_seq("a", 7), make_seq("b", 7), make_seq("c", 7)     # 2 blocks each: pool full
    for seq in (a, b, c):
        scheduler.add(seq)
    for _ in range(2):
        run_step(scheduler, scheduler.schedule())
    assert (a.row, b.row, c.row) == (0, 1, 2)
    plan = scheduler.schedule()         # a and b need a third block: c is preempted
    assert c.status == SequenceStatus.WAITING and c.row == -1
    assert plan.block_updates == [(0, 2, [4]), (1, 2, [5])]      # only the new block ids
    run_step(scheduler, plan)
    for seq in (a, b):
        scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
    plan = scheduler.schedule()         # c resumes (recomputed) in the lowest free row
    assert c.row == 0 and (0, c.params) in plan.new_rows
    assert (0, 0, c.block_table) in plan.block_updates
    run_step(scheduler, plan)
    scheduler.finish(c, SequenceStatus.FINISHED_STOPPED)
    assert scheduler.rows.num_free == 8


def assert_rows_match(engine) -> None:
    table = engine.runner.block_table
    device = table.device_table.cpu().numpy()
    rows = [seq.row for seq in engine.scheduler.running]
    assert len(set(rows)) == len(rows) and all(0 <= r < table.host.shape[0] for r in rows)
    for seq in engine.scheduler.running:
        n = len(seq.block_table)
        if seq.num_computed_tokens == 0 and n == 0:
            continue                        # forked this step, or nothing allocated yet
        assert table.num_blocks[seq.row] == n, seq
        assert table.host[seq.row, :n].tolist() == seq.block_table, seq
        assert device[seq.row, :n].tolist() == seq.block_table, seq
    params = engine.sampler.row_params
    for seq in engine.scheduler.running:
        expected = [seq.params.temperature or 1.0, seq.params.top_p, seq.params.min_p,
                    seq.params.top_k or engine.model_config.vocab_size, float(seq.params.is_greedy)]
        assert np.allclose(params.host[seq.row], expected)


def test_block_table_rows_equal_the_block_managers_tables_in_a_mixed_run(token_model_path):
    engine = LLMEngine(EngineConfig(model=str(token_model_path), dtype="float32", block_size=4,
                                    num_kv_blocks=20, max_model_len=64, max_num_batched_tokens=12,
                                    max_num_seqs=6))
    rng = random.Random(3)
    shared = [rng.randrange(3, 500) for _ in range(9)]
    submitted = 0
    for step in range(400):
        if submitted < 24 and rng.random() < 0.6:
            tail = [rng.randrange(3, 500) for _ in range(rng.randrange(1, 14))]
            prompt = (shared if rng.random() < 0.5 else []) + tail
            params = SamplingParams(n=rng.choice([1, 1, 2]), temperature=rng.choice([0.0, 0.8]),
                                    top_p=0.9, max_tokens=rng.randrange(2, 30), ignore_eos=True, seed=step)
            engine.add_request(f"r{submitted}", prompt, params)
            submitted += 1
            if submitted % 7 == 0:
                engine.abort_request(f"r{submitted - 2}")
        if submitted == 24 and not engine.has_unfinished:
            break
        engine.step()
        assert_rows_match(engine)
    assert not engine.has_unfinished
    assert engine.scheduler.num_preemptions > 0, "the pool must be tight enough to preempt"
    assert engine.block_manager.num_prefix_hits > 0
    assert engine.num_overlapped_steps > 0
    assert_pool_free(engine)

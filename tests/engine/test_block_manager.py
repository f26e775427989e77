"""BlockManager: which block ids a sequence gets, ref counts, prefix-cache hits and eviction order.

Block size 4 throughout, so a 10-token prompt fills blocks 0 and 1 and half of block 2.
"""

from replica.engine.block_manager import BlockManager
from replica.engine.sequence import Sequence
from replica.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_seq(token_ids, index: int = 0) -> Sequence:
    return Sequence("r", list(token_ids), SamplingParams(), arrival_s=0.0, index=index)


def admit(bm: BlockManager, seq: Sequence) -> list[int]:
    """What the scheduler does for a waiting sequence whose whole prompt fits one step."""
    cached = bm.find_cached_prefix(seq)
    num_new_tokens = seq.num_tokens - len(cached) * bm.block_size
    assert bm.can_admit(seq, cached, num_new_tokens)
    bm.admit(seq, cached)
    assert bm.append_slots(seq, num_new_tokens) == []
    return cached


def compute(bm: BlockManager, seq: Sequence) -> None:
    """The forward ran: every token of `seq` is in the cache."""
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)


def ref_counts(bm: BlockManager) -> list[int]:
    return [block.ref_count for block in bm.blocks]


def assert_all_free(bm: BlockManager) -> None:
    assert bm.num_free_blocks == bm.num_blocks
    assert bm.usage == 0.0
    assert ref_counts(bm) == [0] * bm.num_blocks


PROMPT_A = list(range(100, 110))        # 10 tokens: blocks [0, 1] full, block 2 partial


def test_fresh_pool_hands_out_block_ids_in_order_and_takes_them_back():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    a, b = make_seq(PROMPT_A), make_seq([7, 8, 9])
    assert admit(bm, a) == []
    assert admit(bm, b) == []
    assert a.block_table == [0, 1, 2]
    assert b.block_table == [3]
    assert ref_counts(bm) == [1, 1, 1, 1, 0, 0, 0, 0]
    assert bm.num_free_blocks == 4
    assert bm.usage == 0.5

    # a decode that crosses into a new block takes the next free one
    compute(bm, a)
    a.token_ids += [110, 111, 112]      # 13 tokens: needs a 4th block
    assert bm.num_blocks_to_append(a, 3) == 1
    bm.append_slots(a, 3)
    assert a.block_table == [0, 1, 2, 4]
    assert bm.usage == 5 / 8

    bm.free(a)
    bm.free(b)
    assert a.block_table == [] and b.block_table == []
    assert_all_free(bm)


def test_same_prefix_reuses_the_cached_blocks():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    a = make_seq(PROMPT_A)
    admit(bm, a)
    compute(bm, a)

    b = make_seq(PROMPT_A[:8] + [1, 2, 3])      # same two full blocks, different tail
    assert admit(bm, b) == [0, 1]
    assert b.block_table == [0, 1, 3]
    assert b.num_computed_tokens == b.num_cached_tokens == 8
    assert ref_counts(bm)[:4] == [2, 2, 1, 1]
    assert (bm.num_prefix_queries, bm.num_prefix_hits) == (10 + 11, 8)

    bm.free(a)
    bm.free(b)
    assert_all_free(bm)


def test_hashes_are_chained_a_different_first_block_means_no_hit():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    a = make_seq(PROMPT_A)
    admit(bm, a)
    compute(bm, a)
    # block 1's tokens are equal to a's block 1, but they follow a different block 0
    c = make_seq([1, 2, 3, 4] + PROMPT_A[4:8] + [5])
    assert bm.find_cached_prefix(c) == []
    # the same first block alone is a hit of one block
    d = make_seq(PROMPT_A[:4] + [1, 2, 3, 4, 5])
    assert bm.find_cached_prefix(d) == [0]
    bm.free(a)
    assert_all_free(bm)


def test_at_least_one_prompt_token_is_left_to_compute():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    a = make_seq(PROMPT_A)
    admit(bm, a)
    compute(bm, a)
    # a prompt equal to two cached blocks hits only the first: the last token's logits are needed
    assert bm.find_cached_prefix(make_seq(PROMPT_A[:8])) == [0]
    assert bm.find_cached_prefix(make_seq(PROMPT_A[:9])) == [0, 1]
    bm.free(a)


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    a = make_seq(PROMPT_A)
    admit(bm, a)
    compute(bm, a)
    assert bm.find_cached_prefix(make_seq(PROMPT_A)) == []
    bm.free(a)
    assert list(bm.free_queue) == list(range(8))    # nothing hashed: freed blocks go to the head


def test_freed_blocks_queue_unhashed_first_and_cached_ones_least_recently_freed_first():
    bm = BlockManager(num_blocks=6, block_size=BLOCK_SIZE)
    a = make_seq(list(range(100, 108)))     # 8 tokens: blocks 0, 1, both full → hashed
    b = make_seq(list(range(200, 206)))     # 6 tokens: block 2 full → hashed, block 3 partial
    admit(bm, a)
    admit(bm, b)
    compute(bm, a)
    compute(bm, b)
    assert list(bm.free_queue) == [4, 5]

    bm.free(a)      # a's blocks are released last block first, each to the tail
    assert list(bm.free_queue) == [4, 5, 1, 0]
    bm.free(b)      # b's partial block 3 holds nothing reusable: it goes to the head
    assert list(bm.free_queue) == [3, 4, 5, 1, 0, 2]
    assert bm.num_free_blocks == 6

    # A 16-token stranger takes 4 blocks from the head: the unhashed block 3, the never-used 4
    # and 5, then evicts a's block 1, the cached block freed longest ago.
    f = make_seq(list(range(300, 316)))
    assert admit(bm, f) == []
    assert f.block_table == [3, 4, 5, 1]
    assert list(bm.free_queue) == [0, 2]
    assert bm.find_cached_prefix(make_seq(list(range(100, 108)) + [9])) == [0]   # block 1 is gone
    assert bm.find_cached_prefix(make_seq(list(range(200, 204)) + [9])) == [2]   # b's block stays
    bm.free(f)
    assert_all_free(bm)


def test_a_hit_on_a_freed_cached_block_takes_it_back_out_of_the_free_queue():
    bm = BlockManager(num_blocks=6, block_size=BLOCK_SIZE)
    a = make_seq(list(range(100, 108)))
    admit(bm, a)
    compute(bm, a)
    bm.free(a)
    assert list(bm.free_queue) == [2, 3, 4, 5, 1, 0]

    again = make_seq(list(range(100, 108)) + [1, 2])    # 10 tokens: hits blocks 0 and 1
    assert admit(bm, again) == [0, 1]
    assert again.block_table == [0, 1, 2]
    assert list(bm.free_queue) == [3, 4, 5]
    assert ref_counts(bm)[:3] == [1, 1, 1]
    bm.free(again)
    assert_all_free(bm)


def test_fork_shares_every_block_and_copies_the_shared_partial_block_on_write():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    parent = make_seq([10, 11, 12, 13, 14, 15])      # block 0 full, block 1 half full
    admit(bm, parent)
    compute(bm, parent)
    child = make_seq(parent.token_ids, index=1)
    bm.fork(parent, child)
    child.num_computed_tokens = parent.num_computed_tokens
    assert child.block_table == parent.block_table == [0, 1]
    assert ref_counts(bm)[:2] == [2, 2]

    # each sample appends its own token at position 6, inside the shared block 1
    parent.token_ids.append(20)
    child.token_ids.append(21)
    assert bm.num_blocks_to_append(parent, 1) == 1       # the copy
    assert bm.append_slots(parent, 1) == [(1, 2)]        # copy block 1 into block 2 first
    assert parent.block_table == [0, 2]
    assert ref_counts(bm)[:3] == [2, 1, 1]
    # the child is now block 1's only owner and writes in place
    assert bm.num_blocks_to_append(child, 1) == 0
    assert bm.append_slots(child, 1) == []
    assert child.block_table == [0, 1]

    bm.free(parent)
    bm.free(child)
    assert_all_free(bm)


def test_fork_at_a_block_boundary_needs_no_copy():
    bm = BlockManager(num_blocks=8, block_size=BLOCK_SIZE)
    parent = make_seq(list(range(10, 18)))     # exactly two full blocks
    admit(bm, parent)
    compute(bm, parent)
    child = make_seq(parent.token_ids, index=1)
    bm.fork(parent, child)
    child.num_computed_tokens = parent.num_computed_tokens
    parent.token_ids.append(20)
    child.token_ids.append(21)
    assert bm.append_slots(parent, 1) == []
    assert bm.append_slots(child, 1) == []
    assert parent.block_table == [0, 1, 2]
    assert child.block_table == [0, 1, 3]
    assert ref_counts(bm)[:4] == [2, 2, 1, 1]
    bm.free(parent)
    bm.free(child)
    assert_all_free(bm)


def test_prefix_cache_hits_never_exceed_queries_after_a_preempted_sequence_returns():
    bm = BlockManager(num_blocks=16, block_size=BLOCK_SIZE)
    seq = make_seq([10, 11, 12, 13, 14])
    admit(bm, seq)
    compute(bm, seq)
    seq.token_ids += list(range(20, 40))        # 20 output tokens, all computed
    bm.append_slots(seq, 20)
    compute(bm, seq)
    bm.free(seq)                                # preempted
    assert admit(bm, seq) == [0, 1, 2, 3, 4, 5]     # 24 of its 25 tokens come back from the cache
    assert bm.num_prefix_hits <= bm.num_prefix_queries
    bm.free(seq)


def test_blocks_filled_by_decoding_are_registered_once_each_and_hit_later():
    bm = BlockManager(16, BLOCK_SIZE)
    seq = make_seq(range(100, 106))                  # blocks 0, 1 (half full)
    admit(bm, seq)
    compute(bm, seq)
    assert seq.num_registered_blocks == 1
    for token in range(200, 211):                    # decode one token a step, 17 tokens in all
        bm.append_slots(seq, 1)
        seq.token_ids.append(token)
        compute(bm, seq)
        assert seq.num_registered_blocks == seq.num_tokens // BLOCK_SIZE
    registered = [bm.blocks[b].hash is not None for b in seq.block_table]
    assert registered == [True, True, True, True, False]
    same = make_seq(seq.token_ids + [7])
    assert bm.find_cached_prefix(same) == seq.block_table[:4]
    bm.free(seq)
    assert seq.num_registered_blocks == 0
    assert admit(bm, same) == same.block_table[:4] and same.num_registered_blocks == 4
    bm.free(same)
    assert_all_free(bm)

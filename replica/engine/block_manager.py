"""KV-cache blocks: ref counts, the free queue and the prefix-cache hash table.

This is the only place that changes ref counts or the free queue.

Block layout: a sequence's token t lives in block `block_table[t // block_size]` at offset
`t % block_size`. A full block is named by a chained hash over (previous block's hash, its
tokens), so equal prefixes give equal hashes and can share blocks.

Free queue: an ordered dict of the block ids whose ref count is 0, head first. Allocation takes the
head. A freed block that holds a registered prefix goes to the tail (kept as long as possible,
evicted least-recently-freed first); a freed block without a hash goes to the head (nothing to
keep). A cached block that is hit again leaves the queue from the middle, which is why this is an
ordered dict and not a deque.
"""
from collections import OrderedDict

from replica.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None   # checked on a hit, so collisions cannot alias


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_queue: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.hash_to_block: dict[int, int] = {}
        self.num_prefix_queries = 0   # prompt tokens looked up
        self.num_prefix_hits = 0      # of those, tokens found

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    # ---- prefix cache ----------------------------------------------------------------------
    def _full_block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        size = self.block_size
        for i in range(len(seq.block_hashes), num_blocks):
            parent = seq.block_hashes[i - 1] if i else 0
            seq.block_hashes.append(hash((parent, tuple(seq.token_ids[i * size:(i + 1) * size]))))
        return seq.block_hashes[:num_blocks]

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of `seq` (whole blocks only).

        At least one token is always left to compute, so the last token's logits exist."""
        if not self.enable_prefix_caching:
            return []
        size = self.block_size
        hits = []
        for i, h in enumerate(self._full_block_hashes(seq, (seq.num_tokens - 1) // size)):
            block_id = self.hash_to_block.get(h)
            if block_id is None or self.blocks[block_id].token_ids != tuple(
                    seq.token_ids[i * size:(i + 1) * size]):
                break
            hits.append(block_id)
        return hits

    def cache_full_blocks(self, seq: Sequence) -> None:
        """Register the hashes of the blocks `seq` has filled and computed."""
        if not self.enable_prefix_caching:
            return
        num_full = min(seq.num_computed_tokens // self.block_size, len(seq.block_table))
        if num_full <= seq.num_registered_blocks:
            return              # nothing new: a decode step fills a block every block_size tokens
        size = self.block_size
        hashes = self._full_block_hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block, h = self.blocks[seq.block_table[i]], hashes[i]
            if block.hash is None and h not in self.hash_to_block:
                block.hash = h
                block.token_ids = tuple(seq.token_ids[i * size:(i + 1) * size])
                self.hash_to_block[h] = block.block_id
        seq.num_registered_blocks = num_full

    # ---- allocation ------------------------------------------------------------------------
    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_admit(self, seq: Sequence, cached: list[int], num_new_tokens: int) -> bool:
        """Whether a waiting `seq` with prefix hits `cached` can get blocks for its first chunk."""
        num_tokens = len(cached) * self.block_size + num_new_tokens
        num_revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)
        need = self._blocks_for(num_tokens) - len(cached)
        return need + num_revived <= self.num_free_blocks

    def admit(self, seq: Sequence, cached: list[int]) -> None:
        """Give a waiting `seq` its prefix-cache hits; the caller then calls `append_slots`."""
        self.num_prefix_queries += seq.num_tokens   # a recomputed sequence looks up its output too
        self.num_prefix_hits += len(cached) * self.block_size
        for block_id in cached:
            self._take(block_id)
        seq.block_table = list(cached)
        seq.num_registered_blocks = len(cached)       # hits are registered blocks
        seq.num_computed_tokens = seq.num_cached_tokens = len(cached) * self.block_size

    def num_blocks_to_append(self, seq: Sequence, num_new_tokens: int) -> int:
        need = self._blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return max(need, 0) + (1 if self._needs_copy(seq) else 0)

    def can_append(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_blocks_to_append(seq, num_new_tokens) <= self.num_free_blocks

    def append_slots(self, seq: Sequence, num_new_tokens: int) -> list[tuple[int, int]]:
        """Make room for `num_new_tokens` more K/V entries; returns (src, dst) block copies to run
        before the step (copy-on-write of a partly filled block shared after a fork)."""
        copies = []
        if self._needs_copy(seq):
            index = seq.num_computed_tokens // self.block_size
            old = seq.block_table[index]
            new = self._pop_free()
            self._release(old)
            seq.block_table[index] = new
            copies.append((old, new))
        need = self._blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(need):
            seq.block_table.append(self._pop_free())
        return copies

    def _needs_copy(self, seq: Sequence) -> bool:
        index = seq.num_computed_tokens // self.block_size
        return (seq.num_computed_tokens % self.block_size != 0 and index < len(seq.block_table)
                and self.blocks[seq.block_table[index]].ref_count > 1)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """`child` shares every block of `parent` (n > 1 samples of one prompt)."""
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_registered_blocks = parent.num_registered_blocks

    def free(self, seq: Sequence) -> None:
        # Reversed, so a sequence's last blocks (least likely shared) are evicted first.
        for block_id in reversed(seq.block_table):
            self._release(block_id)
        seq.block_table = []
        seq.num_registered_blocks = 0
        seq.num_computed_tokens = 0

    # ---- free queue ------------------------------------------------------------------------
    def _pop_free(self) -> int:
        if not self.free_queue:
            raise RuntimeError("no free KV block: the scheduler must check can_append first")
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None:            # evict its prefix entry
            if self.hash_to_block.get(block.hash) == block_id:
                del self.hash_to_block[block.hash]
            block.hash = block.token_ids = None
        block.ref_count = 1
        return block_id

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_queue[block_id]
        block.ref_count += 1

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_queue[block_id] = None
            if block.hash is None:
                self.free_queue.move_to_end(block_id, last=False)

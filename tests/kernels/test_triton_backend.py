"""TritonAttentionBackend against TorchAttentionBackend over two engine-like steps: a mixed
batch (a prompt chunk after a cached prefix, a whole prompt, a decode), then a decode-only step.
Both read the new keys and values from the cache, where the model's rotary kernel wrote them."""
import torch

from replica.kernels.kv_cache_write import write_kv_cache_ref
from replica.kernels.triton_backend import TritonAttentionBackend
from replica.layers.attention import AttentionMetadata, TorchAttentionBackend
from tests.kernels.paged_batch import ON_GPU, assert_close_rel, head_scale, make_batch


def _meta(batch, is_decode_only):
    return AttentionMetadata(
        slot_mapping=batch.slot_mapping, query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens, block_tables=batch.block_tables,
        max_query_len=batch.max_query_len, max_seq_len=batch.max_seq_len,
        is_decode_only=is_decode_only, block_size=batch.block_size,
    )


def _run_both(batch, is_decode_only):
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    write_kv_cache_ref(batch.k, batch.v, k_cache, v_cache, batch.slot_mapping)
    scale = head_scale(batch.q.shape[-1])
    out = TritonAttentionBackend().forward(batch.q, k_cache, v_cache, _meta(batch, is_decode_only), scale)
    ref = TorchAttentionBackend().forward(batch.q.float(), k_cache.float(), v_cache.float(),
                                          _meta(batch, is_decode_only), scale)
    assert_close_rel(out, ref, batch.q.dtype)


def test_mixed_step_then_decode_step():
    if ON_GPU:
        shapes = {"num_heads": 32, "num_kv_heads": 8, "head_dim": 128, "block_size": 16}
        seq_lens, query_lens = [1300, 512, 2049], [256, 512, 1]
    else:
        shapes = {"num_heads": 4, "num_kv_heads": 2, "head_dim": 64, "block_size": 4}
        seq_lens, query_lens = [30, 9, 17], [6, 9, 1]
    _run_both(make_batch(seq_lens, query_lens, seed=11, **shapes), is_decode_only=False)
    decode_lens = [s + 1 for s in seq_lens]
    _run_both(make_batch(decode_lens, [1] * len(seq_lens), seed=12, **shapes), is_decode_only=True)


def test_decode_num_splits_is_chosen_once_per_step():
    batch = make_batch([40, 3], [1, 1], num_heads=4, num_kv_heads=2, head_dim=64, block_size=4)
    meta = _meta(batch, True)
    meta.decode_num_splits = 3           # e.g. a CUDA-graph bucket's static value
    backend = TritonAttentionBackend()
    out = backend.forward(batch.q, batch.k_cache, batch.v_cache, meta, 0.125)
    assert meta.decode_num_splits == 3
    assert not out.isnan().any()
    fresh = _meta(batch, True)
    backend.forward(batch.q, batch.k_cache, batch.v_cache, fresh, 0.125)
    assert fresh.decode_num_splits is not None, "the first layer picks it for the others"


def test_attention_reads_the_cache_and_never_writes_it():
    batch = make_batch([40, 3], [1, 1], num_heads=4, num_kv_heads=2, head_dim=64, block_size=4)
    for backend in (TritonAttentionBackend(), TorchAttentionBackend()):
        k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
        backend.forward(batch.q, k_cache, v_cache, _meta(batch, True), 0.125)
        assert torch.equal(k_cache, batch.k_cache) and torch.equal(v_cache, batch.v_cache)

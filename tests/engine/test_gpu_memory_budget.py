"""The KV budget of a replica on the GPU (replica/engine/gpu_memory.py): --gpu-memory-utilization is
that replica's share, so replicas sharing a GPU each get their own cache."""
from replica.engine.gpu_memory import _GRAPH_MARGIN_BYTES, kv_budget_bytes

GIB = 1 << 30
TOTAL = 140 * GIB
WEIGHTS_AND_CONTEXT = 16 * GIB
ACTIVATIONS = GIB // 4


def test_four_replicas_at_a_fifth_each_get_the_same_cache_whatever_the_others_hold():
    budgets = []
    for num_before in range(4):  # the others' weights and caches are in use, not this one's
        free = TOTAL - num_before * 28 * GIB - WEIGHTS_AND_CONTEXT
        budgets.append(kv_budget_bytes(TOTAL, 0.2, WEIGHTS_AND_CONTEXT, free, ACTIVATIONS))
    expected = int(TOTAL * 0.2 - WEIGHTS_AND_CONTEXT - ACTIVATIONS - _GRAPH_MARGIN_BYTES)
    assert budgets == [expected] * 4 and expected > 11 * GIB


def test_a_share_larger_than_the_free_memory_gets_only_what_is_free():
    free = 10 * GIB  # another tenant holds the rest of the GPU
    budget = kv_budget_bytes(TOTAL, 0.9, WEIGHTS_AND_CONTEXT, free, ACTIVATIONS)
    assert budget == free - ACTIVATIONS - _GRAPH_MARGIN_BYTES


def test_weights_larger_than_the_share_leave_no_cache():
    assert kv_budget_bytes(TOTAL, 0.1, WEIGHTS_AND_CONTEXT, TOTAL - WEIGHTS_AND_CONTEXT, ACTIVATIONS) <= 0

"""Piecewise graphs' forward (`replica/engine/piecewise_graphs.py`): the pieces between attentions
through static buffers, padded to a token bucket. The CUDA capture itself is tested on a GPU
(tests/gpu/test_cuda_engine.py); here the same pieces run eagerly through the same buffers, which
is what a replay computes.
"""
import pytest

from replica.config import EngineConfig
from replica.engine.llm import LLM
from replica.engine.piecewise_graphs import PiecewiseGraphs, token_buckets
from replica.sampling_params import SamplingParams
from tests.tiny_models import make_tiny_model

from .conftest import assert_pool_free

# uneven prompt lengths and a budget of 24 tokens: steps of every size from 1 to 24 tokens, decodes
# and prefill chunks mixed, and the same bucket padded from different sizes in turn
PROMPTS = [[5, 17, 99], [240, 31, 7, 300, 8, 9, 10] * 3, [1] * 12, [400, 401], [33] * 20, [77] * 9,
           [200 + i for i in range(37)]]


def test_buckets_pad_a_step_over_128_tokens_by_less_than_an_eighth():
    buckets = token_buckets(2048)
    assert buckets[:3] == [16, 32, 48] and buckets[-1] == 2048
    for n in range(129, 2049):
        bucket = next(b for b in buckets if b >= n)
        assert bucket - n < n / 8, (n, bucket)
    assert token_buckets(10) == [10] and token_buckets(300)[-2:] == [288, 300]


def test_a_negative_token_bound_is_refused_with_the_way_out():
    with pytest.raises(ValueError, match=r"cuda_graph_max_tokens must be >= 0 \(0: no piecewise graphs\), got -1"):
        EngineConfig(cuda_graph_max_tokens=-1)


def _attach_piecewise(llm: LLM, max_tokens: int) -> list[int]:
    """Gives the engine's runner eager piecewise forwards; returns the list of each step's T."""
    runner = llm.engine.runner
    scratch_block = runner.kv_cache.shape[2] - 1
    pieces = PiecewiseGraphs(runner.model, runner.kv_caches, scratch_block, runner.block_size, max_tokens)
    sizes = []
    run = pieces.run

    def counted_run(input_ids, positions, meta):
        sizes.append(len(input_ids))
        return run(input_ids, positions, meta)

    pieces.run = counted_run
    runner.piecewise = pieces
    return sizes


@pytest.fixture(scope="module")
def arch_paths(tmp_path_factory):
    """Tiny token-id models of the other layer variants: qkv bias and tied embeddings (qwen2),
    q/k norms (qwen3)."""
    return {arch: make_tiny_model(tmp_path_factory.mktemp(arch), arch, with_tokenizer=False)
            for arch in ("qwen2", "qwen3")}


@pytest.mark.parametrize("arch,overlap", [("llama", True), ("llama", False), ("qwen2", True), ("qwen3", True)])
def test_pieces_through_padded_buffers_give_the_forwards_tokens(token_model_path, arch_paths, arch, overlap):
    path = token_model_path if arch == "llama" else arch_paths[arch]
    settings = dict(dtype="float32", block_size=4, num_kv_blocks=96, max_model_len=64,
                    max_num_batched_tokens=24, enable_overlap=overlap)
    plain = LLM(str(path), **settings)
    piecewise = LLM(str(path), **settings)
    sizes = _attach_piecewise(piecewise, max_tokens=40)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    expected = [r.outputs[0].token_ids for r in plain.generate(PROMPTS, params)]
    got = [r.outputs[0].token_ids for r in piecewise.generate(PROMPTS, params)]
    assert got == expected
    # the pieces ran every step with a prefill chunk, padded (sizes not on a bucket) and not
    assert len(sizes) > 5 and any(s not in (16, 32, 40) for s in sizes) and 24 in sizes
    for llm in (plain, piecewise):
        assert_pool_free(llm.engine)

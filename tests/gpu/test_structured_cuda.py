"""Structured outputs on a CUDA GPU: the bitmask applied on the GPU equals the CPU path (padded
logits included), and constrained generation through CUDA graphs validates while the
unconstrained rows of the same batch keep their tokens. Skipped without CUDA."""
import json

import jsonschema
import pytest
import torch

from replica.engine.structured_output import AllowedMask
from replica.sampling_params import SamplingParams, StructuredOutputSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_the_allowed_mask_on_the_gpu_equals_the_cpu_one():
    import xgrammar as xgr

    vocab = ["{", "}", '"', "a", "b", ":", ",", " ", "1", "2", "true", "<eos>"] + [f"t{i}" for i in range(500)]
    info = xgr.TokenizerInfo(vocab, stop_token_ids=[11])
    compiled = xgr.GrammarCompiler(info).compile_json_schema(
        '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}',
        any_whitespace=False)
    matcher = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(4, len(vocab))
    matcher.fill_next_token_bitmask(bitmask, 2)
    width = len(vocab) + 37                 # an embedding padded past the tokenizer
    logits = torch.randn(4, width, generator=torch.Generator().manual_seed(0))
    cpu, gpu = logits.clone(), logits.cuda()
    rows = torch.tensor([2])
    AllowedMask(bitmask, rows, len(vocab)).apply(cpu)
    AllowedMask(bitmask.cuda(), rows.cuda(), len(vocab)).apply(gpu)
    torch.testing.assert_close(gpu.cpu(), cpu)
    assert torch.isinf(cpu[2]).sum() == width - 1        # only "{" may open the object
    torch.testing.assert_close(cpu[[0, 1, 3]], logits[[0, 1, 3]])


def test_constrained_generation_on_the_gpu_validates(tmp_path):
    from replica.engine.llm import LLM
    from tests.tiny_models import make_tiny_model

    try:
        path = make_tiny_model(tmp_path / "m", "llama", with_tokenizer=True)
    except Exception as err:          # the bundled SmolLM2 (its tokenizer) is not installed
        pytest.skip(f"no SmolLM2 tokenizer here: {type(err).__name__}")
    llm = LLM(str(path), device="cuda", dtype="float32", block_size=16, num_kv_blocks=256,
              max_model_len=512)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "n"], "additionalProperties": False}
    spec = StructuredOutputSpec("json_schema", json.dumps(schema))
    params = [SamplingParams(temperature=t, seed=i, max_tokens=100, structured_output=spec)
              for i, t in enumerate([0.0, 1.0] * 8)]
    for result in llm.generate(["x"] * 16, params):
        jsonschema.validate(json.loads(result.outputs[0].text), schema)
    assert llm.engine.runner.graphs is not None, "decode ran through CUDA graphs"
    # a mixed batch: the unconstrained rows get the tokens they get alone, with overlap on
    plain = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    prompts = ["a", "b", "c", "d"]
    alone = [r.outputs[0].token_ids for r in llm.generate(prompts, plain)]
    llm.engine.num_overlapped_steps = 0
    mixed = llm.generate(prompts, [params[0], plain, params[0], plain])
    assert [mixed[1].outputs[0].token_ids, mixed[3].outputs[0].token_ids] == [alone[1], alone[3]]
    assert llm.engine.num_overlapped_steps > 20
    for result in (mixed[0], mixed[2]):
        jsonschema.validate(json.loads(result.outputs[0].text), schema)

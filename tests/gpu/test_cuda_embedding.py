"""Embeddings on a CUDA GPU (Triton attention over the scratch K/V) equal transformers' pooled
last hidden state, and leave the KV pool and CUDA graphs alone. Skipped without CUDA."""
import pytest
import torch
import torch.nn.functional as F

from replica.engine.llm import LLM
from replica.sampling_params import SamplingParams
from tests.tiny_models import load_hf_model, make_tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_cuda_embeddings_equal_transformers(tmp_path, pooling):
    path = make_tiny_model(tmp_path / "llama", "llama", with_tokenizer=False, hidden_size=256,
                           num_attention_heads=4, num_key_value_heads=2, intermediate_size=512)
    hf = load_hf_model(path).cuda()
    llm = LLM(str(path), device="cuda", dtype="float32", block_size=16, num_kv_blocks=256,
              max_model_len=512, max_num_batched_tokens=128)
    gen = torch.Generator().manual_seed(0)
    inputs = [torch.randint(3, 512, (n,), generator=gen).tolist() for n in (1, 7, 16, 17, 100, 300)]
    vectors = llm.engine.embed(inputs, pooling)          # 300 > 128 tokens: a batch of its own
    for ids, vector in zip(inputs, vectors):
        with torch.no_grad():
            hidden = hf.model(torch.tensor([ids], device="cuda")).last_hidden_state[0]
        ref = F.normalize(hidden.mean(0) if pooling == "mean" else hidden[-1], dim=-1).cpu()
        torch.testing.assert_close(torch.tensor(vector), ref, atol=2e-4, rtol=2e-4)
    out = llm.generate([inputs[2]], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 8
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks

"""A W8A8 projection's input quantised by the kernel that produces it: the RMSNorm (with and
without the residual add) and SiLU·mul writing e4m3 codes and per-row scales give exactly what the
separate per-token quantiser gives on their unfused outputs, and the model's forward through them
gives the logits of the unfused path."""
import pytest
import torch

from replica.kernels.fp8_linear import FP8_DTYPE, Fp8Rows, fp8_linear_ref, fp8_rows_linear_ref, quantize_rows_ref
from replica.kernels.rms_norm_triton import fused_add_rms_norm, fused_add_rms_norm_fp8, rms_norm
from replica.kernels.silu_mul_triton import silu_and_mul, silu_and_mul_fp8
from tests.kernels.paged_batch import DEVICE, DTYPE, ON_GPU

# bf16 on the GPU (the model dtype); the interpreter's float32 otherwise (see conftest.py)
ROW_DTYPE = torch.bfloat16 if ON_GPU else DTYPE


def _expect_same_rows(rows: Fp8Rows, unfused: torch.Tensor) -> None:
    want_q, want_scale = quantize_rows_ref(unfused)
    assert rows.q.dtype == FP8_DTYPE and rows.dtype == unfused.dtype
    assert torch.equal(rows.scale, want_scale)
    assert torch.equal(rows.q.float(), want_q.float())


@pytest.mark.parametrize("num_rows,hidden", [(1, 64), (5, 256), (3, 200)])
@pytest.mark.parametrize("with_residual", [True, False])
def test_rms_norm_writes_the_quantised_rows_of_its_output(num_rows, hidden, with_residual):
    gen = torch.Generator().manual_seed(num_rows * hidden)
    x = (torch.randn(num_rows, hidden, generator=gen) * torch.logspace(-2, 1, num_rows)[:, None]).to(ROW_DTYPE)
    residual = torch.randn(num_rows, hidden, generator=gen).to(ROW_DTYPE) if with_residual else None
    weight = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(ROW_DTYPE)
    x, weight = x.to(DEVICE), weight.to(DEVICE)
    residual = residual.to(DEVICE) if residual is not None else None
    rows, new_residual = fused_add_rms_norm_fp8(x, residual, weight, 1e-5)
    if with_residual:
        unfused, want_residual = fused_add_rms_norm(x, residual, weight, 1e-5)
        assert torch.equal(new_residual, want_residual)
    else:
        unfused = rms_norm(x, weight, 1e-5)
        assert new_residual is x
    _expect_same_rows(rows, unfused)


@pytest.mark.parametrize("one_pass", [True, False])
@pytest.mark.parametrize("num_rows,intermediate", [(1, 64), (4, 1000), (2, 2048 + 64)])
def test_silu_and_mul_writes_the_quantised_rows_of_its_output(num_rows, intermediate, one_pass, monkeypatch):
    from replica.kernels import fp8_quant_triton
    monkeypatch.setattr(fp8_quant_triton, "ONE_PASS_COLS", 1 << 14 if one_pass else 8)
    gen = torch.Generator().manual_seed(num_rows + intermediate)
    x = (torch.randn(num_rows, 2 * intermediate, generator=gen) * 3).to(ROW_DTYPE).to(DEVICE)
    x[0, :intermediate] = 0.0                          # an all-zero row keeps a finite scale
    _expect_same_rows(silu_and_mul_fp8(x), silu_and_mul(x))


def test_prequantised_rows_give_the_product_of_quantising_inside_the_linear():
    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(6, 256, generator=gen), torch.randn(48, 256, generator=gen) * 0.02
    w_q, w_scale = quantize_rows_ref(w)
    rows = Fp8Rows(*quantize_rows_ref(x), x.dtype)
    assert torch.equal(fp8_rows_linear_ref(rows, w_q, w_scale[:, 0]), fp8_linear_ref(x, w_q, w_scale[:, 0]))


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU or torch.cuda.get_device_capability() < (8, 9), reason="needs an Ada or Hopper GPU")
def test_fp8_model_logits_are_the_same_with_the_producers_quantising(tmp_path, monkeypatch):
    """A whole FP8 model, 24 prompt tokens a sequence (W8A8 in every projection): the fused
    producers change no logit."""
    from replica.config import EngineConfig
    from replica.engine.engine import LLMEngine
    from replica.layers import quantized_linear
    from replica.sampling_params import SamplingParams
    from tests.tiny_models import make_tiny_model

    path = make_tiny_model(tmp_path / "tiny", "llama", with_tokenizer=False)
    logits = {}
    for fused in (True, False):
        monkeypatch.setattr(quantized_linear, "FUSE_FP8_QUANT", fused)
        engine = LLMEngine(EngineConfig(model=str(path), device="cuda", dtype="bfloat16", quantization="fp8",
                                        num_kv_blocks=64, max_model_len=128, enforce_eager=True))
        seen = []
        execute = engine.runner.execute

        def recording(plan, *args, **kwargs):
            out = execute(plan, *args, **kwargs)
            seen.append(out.float().cpu())
            return out
        engine.runner.execute = recording
        for i in range(3):
            engine.add_request(str(i), list(range(5 + i, 29 + i)), SamplingParams(temperature=0.0, max_tokens=1))
        while engine.has_unfinished:
            engine.step()
        logits[fused] = torch.cat(seen)
    assert torch.equal(logits[True], logits[False])

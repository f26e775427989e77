"""ops dispatch: the torch reference on the CPU or when the "torch" kernel backend is selected, the
Triton kernel on CUDA."""
import pytest
import torch
import torch.nn.functional as F

from replica.kernels import ops
from replica.kernels.kv_cache_write import write_kv_cache_ref
from replica.kernels.rms_norm import fused_add_rms_norm_ref, rms_norm_ref
from replica.kernels.rotary import apply_rotary_ref
from replica.kernels.rotary_kv_write import apply_rotary_and_write_kv_ref
from replica.kernels.silu_mul import silu_and_mul_ref
from tests.kernels.paged_batch import ON_GPU


def _inputs(device):
    gen = torch.Generator().manual_seed(0)
    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)
    return {
        "x": rand(5, 64), "residual": rand(5, 64), "weight": rand(64), "gate_up": rand(5, 96),
        "q": rand(5, 4, 32), "k": rand(5, 2, 32), "positions": torch.tensor([0, 1, 2, 7, 3], device=device),
        "cos_sin": torch.cat((rand(8, 16).cos(), rand(8, 16).sin()), dim=-1),
        "k_cache": rand(3, 4, 2, 32), "slots": torch.tensor([0, 5, 6, 11, 2], device=device),
    }


def _check_all(device, exact):
    t = _inputs(device)
    compare = torch.equal if exact else (lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=1e-5))
    assert compare(ops.rms_norm(t["x"], t["weight"], 1e-6), rms_norm_ref(t["x"], t["weight"], 1e-6))
    out, summed = ops.fused_add_rms_norm(t["x"], t["residual"], t["weight"], 1e-6)
    ref_out, ref_summed = fused_add_rms_norm_ref(t["x"], t["residual"], t["weight"], 1e-6)
    assert compare(out, ref_out) and compare(summed, ref_summed)
    q, k = ops.apply_rotary(t["q"], t["k"], t["positions"], t["cos_sin"])
    q_ref, k_ref = apply_rotary_ref(t["q"], t["k"], t["positions"], t["cos_sin"])
    assert compare(q, q_ref) and compare(k, k_ref)
    assert compare(ops.silu_and_mul(t["gate_up"]), silu_and_mul_ref(t["gate_up"]))
    k_cache, v_cache = t["k_cache"].clone(), t["k_cache"].clone()
    ref_k, ref_v = t["k_cache"].clone(), t["k_cache"].clone()
    ops.write_kv_cache(t["k"], t["k"] * 2, k_cache, v_cache, t["slots"])
    write_kv_cache_ref(t["k"], t["k"] * 2, ref_k, ref_v, t["slots"])
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    q = ops.apply_rotary_and_write_kv(t["q"], t["k"], t["k"] * 2, t["positions"], t["cos_sin"],
                                      k_cache, v_cache, t["slots"])
    q_ref = apply_rotary_and_write_kv_ref(t["q"], t["k"], t["k"] * 2, t["positions"], t["cos_sin"],
                                          ref_k, ref_v, t["slots"])
    assert compare(q, q_ref) and compare(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    # float32 inputs: F.linear everywhere (the Triton GEMM takes 16-bit weights only)
    assert torch.equal(ops.linear(t["x"], t["residual"], t["weight"][:5]),
                       F.linear(t["x"], t["residual"], t["weight"][:5]))


def test_cpu_tensors_take_the_reference_path():
    assert not ops.is_triton_enabled(torch.zeros(1))
    _check_all("cpu", exact=True)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_cuda_tensors_take_triton_unless_the_torch_backend_is_selected():
    ops.select_kernel_backend("triton")
    assert ops.is_triton_enabled(torch.zeros(1, device="cuda"))
    _check_all("cuda", exact=False)
    try:
        ops.select_kernel_backend("torch")
        assert not ops.is_triton_enabled(torch.zeros(1, device="cuda"))
        _check_all("cuda", exact=True)
    finally:
        ops.select_kernel_backend("triton")


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
def test_linear_takes_triton_for_few_16bit_rows(monkeypatch):
    from replica.kernels import linear_triton

    calls = []
    real = linear_triton.skinny_linear
    monkeypatch.setattr(linear_triton, "skinny_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    ops.select_kernel_backend("triton")
    weight = torch.randn(256, 128, device="cuda", dtype=torch.bfloat16)
    for num_rows in (1, 8, 9, 64):
        x = torch.randn(num_rows, 128, device="cuda", dtype=torch.bfloat16)
        torch.testing.assert_close(ops.linear(x, weight), F.linear(x, weight))
    ops.linear(torch.randn(1, 128, device="cuda"), weight.float())       # float32: cuBLAS
    assert calls == [1, 8]

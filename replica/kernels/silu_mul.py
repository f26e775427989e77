"""SiLU-and-multiply of the fused gate/up projection."""
import torch


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    # x: [T, 2 * intermediate] laid out as [gate | up]
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up

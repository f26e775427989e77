"""Programmatic dependent launch (PDL) for the Triton kernels, Hopper and later.

A decode step is ~400 short kernels in a row (batch 1, 8B: ~12 a layer), and between two of
them the GPU normally drains the first grid completely before it starts the second. With PDL a
kernel is launched with `launch_pdl=True` and may start while its predecessor still runs:

    kernel A   ──[programs]──release──────────[tail]──▶ done
    kernel B              (launched)──wait─────────────▶ [programs]──release── ...

Every kernel here begins with `wait_and_release`: `griddepcontrol.wait` blocks until the
predecessor has finished and its writes are visible, so nothing is read or written before it;
then `griddepcontrol.launch_dependents` lets the next kernel be scheduled as this one's programs
retire. Because each kernel waits before it releases, at most two grids overlap and all earlier
kernels are complete when a wait returns. Kernels launched without the attribute (torch's,
cuBLAS) serialise as usual. On an H200, a chain of a GEMV and an element-wise kernel measured
6.7 → 5.0 µs a pair inside a CUDA graph (bench/NOTES.md, "PDL").

Off on the CPU (Triton's interpreter), before sm_90, and with PAGEFLEET_PDL=0.
"""
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


@functools.cache
def uses_pdl(device: torch.device) -> bool:
    if device.type != "cuda" or os.environ.get("PAGEFLEET_PDL", "1") == "0":
        return False
    return torch.cuda.get_device_capability(device) >= (9, 0)


def launch_options(device: torch.device) -> dict:
    """The kernel's PDL constexpr and the launch attribute, to splat into a launch."""
    return {"PDL": True, "launch_pdl": True} if uses_pdl(device) else {"PDL": False}


@triton.jit
def wait_and_release(PDL: tl.constexpr):
    """First statement of every kernel launched with `launch_options`."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()

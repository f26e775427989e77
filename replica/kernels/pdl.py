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
6.7 → 5.0 µs a pair inside a CUDA graph, and W2 decode gained 3-7 % (bench/NOTES.md, "PDL, and
fewer kernels a layer").

A kernel whose operands are partly fixed (a GEMV's weights) may touch those before it waits:
`prefetch_l2` asks L2 for their lines while the kernel before it still runs, so the first wave's
weights stream from HBM during a short predecessor (a norm, attention's reduce) instead of after
it. Nothing the predecessor writes may be read, or prefetched, before the wait. What no kernel
of the step writes at all (sequence lengths, block tables, positions, slots: copied in before the
graph; the rotary table) may even be loaded before it, where a short kernel's chain of dependent
loads starts there (`EARLY_LOADS`: decode attention's split, rotary + KV write, the RMSNorms'
weights).

Where: PAGEFLEET_PDL=graphs (the default) inside the decode CUDA graphs only, where a step is
hundreds of short kernels back to back; "all" in eager steps too; "0" nowhere. Never on the CPU
(Triton's interpreter) or before sm_90.
"""
import contextlib
import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


MODES = ("graphs", "all", "0")
# Under PDL, short kernels load their host-written operands before the wait (see above). False: after (A/B).
EARLY_LOADS = True
_capturing = {"graphs": False}     # set by `capturing_graphs` around the decode graphs' capture


@functools.cache
def mode() -> str:
    value = os.environ.get("PAGEFLEET_PDL", "graphs")
    if value not in MODES:
        raise ValueError(f"PAGEFLEET_PDL={value!r}: expected one of {', '.join(MODES)}")
    return value


@functools.cache
def _supported(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (9, 0)


def uses_pdl(device: torch.device) -> bool:
    wanted = mode()
    return _supported(device) and (wanted == "all" or (wanted == "graphs" and _capturing["graphs"]))


@contextlib.contextmanager
def capturing_graphs():
    """Kernels launched inside (the decode graphs' warm-up and capture) use PDL in mode "graphs"."""
    _capturing["graphs"] = True
    try:
        yield
    finally:
        _capturing["graphs"] = False


def launch_options(device: torch.device) -> dict:
    """The kernel's PDL constexpr and the launch attribute, to splat into a launch."""
    return {"PDL": True, "launch_pdl": True} if uses_pdl(device) else {"PDL": False}


@triton.jit
def wait_and_release(PDL: tl.constexpr):
    """First statement of every kernel launched with `launch_options`."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask L2 for the lines under `ptrs` (any shape, every address inside its tensor; no wait,
    nothing written): the operands a kernel reads after `wait_and_release` that no earlier kernel
    writes."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)

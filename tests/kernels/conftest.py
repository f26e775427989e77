"""Kernel tests run the Triton kernels compiled on a CUDA GPU, or through Triton's interpreter
on the CPU. The interpreter must be switched on before any kernel is defined (Triton chooses
between compiling and interpreting when a kernel is decorated, i.e. when its module is imported),
hence this file sets TRITON_INTERPRET before the test modules import replica.kernels.*_triton.
If some other test imported a Triton kernel module first, it is reloaded here.
Under the interpreter the tests use float32: Triton 3.9's interpreter computes bf16 `tl.dot`
wrongly and rounds float32 → bf16 casts differently from the GPU, so bf16 is tested on CUDA only.

The interpreter's integer-overflow sanitizer is switched off: it wraps every integer add, sub
and mul in casts, comparisons and an assert, which doubled the kernel tests' time, and compiled
kernels (what the engine runs) have no such check. An emulation that wrapped around would still
fail its test: every kernel test compares values with a reference.
"""
import dataclasses
import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    from triton.runtime import interpreter

    @dataclasses.dataclass(frozen=True)
    class _Options(interpreter.InterpreterOptions):
        sanitize_overflow: bool = False

    interpreter.InterpreterOptions = _Options
    # Triton 3.9 builds the interpreter's one builder, with its options, when the module is
    # imported: the class above only reaches builders made later, so the options are replaced too.
    interpreter.interpreter_builder.options = _Options()
    for name in sorted(sys.modules):
        if name.startswith("replica.kernels.") and name.endswith("_triton"):
            importlib.reload(sys.modules[name])
    if "replica.kernels.triton_backend" in sys.modules:
        importlib.reload(sys.modules["replica.kernels.triton_backend"])

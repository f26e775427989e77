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

A launch patches `triton.language` with the interpreter's functions for the whole grid, and
Triton 3.9 patches it again at every call of a @triton.jit helper inside the kernel (each call
walks the language's members with `inspect.getmembers`: ~3 ms, a third of a GEMV test's time).
Those patches are skipped here when the running launch (or an earlier helper of it: Triton
never restores a helper's patch) already patched every language module the helper sees: the same
modules, patched the same way. The helper then runs as Triton runs it.

Each interpreted launch is also recorded (`sm90_specs`): `test_sm90_compile`, which runs last,
compiles every specialisation the run met for sm_90, since the interpreter accepts code that
Triton's compiler rejects.
"""
import dataclasses
import functools
import importlib
import inspect
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

    _patched_langs: list[set[int]] = []      # per running launch: ids of the patched language modules

    @functools.cache
    def _langs(fn) -> frozenset[int]:
        return frozenset(id(value) for value in fn.__globals__.values()
                         if inspect.ismodule(value) and value in (interpreter.tl, interpreter.tl.core))

    _launch = interpreter.GridExecutor.__call__
    _device_call = interpreter.InterpretedFunction.__call__

    def _launch_once_patched(self, *args, **kwargs):
        _patched_langs.append(set(_langs(self.fn)))
        try:
            return _launch(self, *args, **kwargs)
        finally:
            _patched_langs.pop()

    def _device_call_in_patched_launch(self, *args, **kwargs):
        langs = _langs(self.fn)
        if not _patched_langs or not langs <= _patched_langs[-1]:
            if _patched_langs:               # Triton never restores what a helper's call patched
                _patched_langs[-1].update(langs)
            return _device_call(self, *args, **kwargs)
        fn = self.rewrite()                  # InterpretedFunction.__call__ without its _patch_lang
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            raise interpreter.InterpreterError(repr(e)) from e

    from tests.kernels import sm90_specs
    _run = interpreter.InterpretedFunction.run

    def _recorded_run(self, *args, grid, warmup, **kwargs):
        """Each launch's specialisation, for `test_sm90_compile` (never fails a launch)."""
        try:
            sm90_specs.record(self.fn, args, kwargs)
        except Exception:                    # noqa: BLE001 (an untyped launch is left out)
            pass
        return _run(self, *args, grid=grid, warmup=warmup, **kwargs)

    interpreter.InterpretedFunction.run = _recorded_run
    interpreter.GridExecutor.__call__ = _launch_once_patched
    interpreter.InterpretedFunction.__call__ = _device_call_in_patched_launch
    for name in sorted(sys.modules):
        if name.startswith("replica.kernels.") and name.endswith("_triton"):
            importlib.reload(sys.modules[name])
    if "replica.kernels.triton_backend" in sys.modules:
        importlib.reload(sys.modules["replica.kernels.triton_backend"])

"""The kernel specialisations the interpreter ran, compiled for a GPU offline.

CI has no GPU, so the kernel tests run Triton's interpreter, which executes a kernel's Python: code
that Triton's compiler rejects can pass them (a helper returning early inside a constexpr branch
did, 2026-12-01, and broke bf16 steps of several rows on every GPU). `record` (installed by
conftest.py around the interpreter's launches) keeps each launch's kernel, argument types,
constexpr values and warps, and the same with the GPU-only switches on (`gpu_flavour`);
`compile_all` compiles each distinct one for sm_90 as the GPU would (PTX, then ptxas), in a child
process without the interpreter.
"""
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]

_POINTER_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                  torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32", torch.int64: "i64",
                  torch.bool: "i1", torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5"}
LAUNCH_OPTIONS = ("num_warps", "num_stages")

recorded: set[str] = set()      # one JSON spec per distinct launch


def _is_constexpr(param: inspect.Parameter) -> bool:
    annotation = param.annotation
    return getattr(annotation, "__name__", None) == "constexpr" or "constexpr" in str(annotation)


def record(fn, args: tuple, kwargs: dict) -> None:
    """One interpreted launch of the kernel `fn` (its Python function) → a spec in `recorded`;
    a launch whose arguments this cannot type is left out (it still ran)."""
    if fn.__module__ == "tests.kernels.sm90_fixtures":
        return
    sig = inspect.signature(fn)
    bound = sig.bind_partial(*args, **{k: v for k, v in kwargs.items() if k in sig.parameters})
    bound.apply_defaults()
    types, constexprs = {}, {}
    for name, param in sig.parameters.items():
        value = bound.arguments.get(name)
        if _is_constexpr(param) or value is None:
            value = getattr(value, "value", value)            # a tl.constexpr passed as is
            if not isinstance(value, (bool, int, float, str, type(None))):
                return
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            if value.dtype not in _POINTER_TYPES:
                return
            types[name] = "*" + _POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            types[name] = "i1"
        elif isinstance(value, int):
            types[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            types[name] = "fp32"
        else:
            return
    options = {k: kwargs[k] for k in LAUNCH_OPTIONS if k in kwargs}
    recorded.add(json.dumps([fn.__module__, fn.__name__, types, constexprs, options], sort_keys=True))
    recorded.add(json.dumps([fn.__module__, fn.__name__, types, gpu_flavour(constexprs), options], sort_keys=True))


# switches that only a GPU turns on (PDL and what it allows, dp4a, cache hints): each launch is also
# compiled with them on, so that their code compiles though no CPU test runs it
GPU_ONLY = {"PDL": True, "DP4A": True, "STREAM": True}
UNDER_PDL = {"PREFETCH": True, "EARLY": True}


def gpu_flavour(constexprs: dict) -> dict:
    """constexprs with the GPU-only switches they have turned on."""
    flavoured = {k: GPU_ONLY.get(k, v) if isinstance(v, bool) else v for k, v in constexprs.items()}
    if flavoured.get("PDL"):
        flavoured.update({k: on for k, on in UNDER_PDL.items() if isinstance(flavoured.get(k), bool)})
    return flavoured


_CHILD = r'''
import importlib, json, sys
from concurrent.futures import ProcessPoolExecutor
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile_one(spec):
    module, name, types, constexprs, options = json.loads(spec)
    fn = getattr(importlib.import_module(module), name)
    names = fn.arg_names
    src = ASTSource(fn=fn, signature={n: types.get(n, "constexpr") for n in names},
                    constexprs={(names.index(k),): v for k, v in constexprs.items()})
    try:
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        return None
    except Exception as e:
        return f"{module}.{name} {json.dumps(constexprs, sort_keys=True)} {options}: {type(e).__name__}: " + str(e)[-1500:]

specs = json.load(sys.stdin)
with ProcessPoolExecutor(max_workers=int(sys.argv[1])) as pool:
    failures = [f for f in pool.map(compile_one, specs) if f]
print(json.dumps(failures))
'''


def compile_all(specs: list[str], workers: int = 2, timeout_s: int = 900) -> list[str]:
    """Each spec compiled for sm_90 → the failures' messages (empty: all compiled)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run([sys.executable, "-c", _CHILD, str(workers)], input=json.dumps(sorted(specs)),
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout_s)
    if result.returncode != 0:
        raise RuntimeError(f"the compile child failed: {result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])

"""The 4-bit decode GEMV (`gguf_gemv_triton._q4_gemv_kernel`, int8 x; at 6 bits for the Q6_K output
head) compiled offline for sm_90 with one 8B projection's specialisation, as the GPU's JIT would
specialise it (16-divisible pointers and sizes), and its SASS printed: no GPU needed, so a change
to the kernel's instruction stream can be looked at before a device run. Prints the SASS, then a
summary (registers, instructions, loads) to stderr.

    python bench/sass_gemv.py qkv                          # Q4_0's qkv_proj, the default tile
    python bench/sass_gemv.py gate_up Q4_K STREAM=false    # any constexpr overridden (JSON values)
    python bench/sass_gemv.py head                         # the Q6_K head (6-bit lanes)
    PYTHONPATH=/tmp/t36:. python bench/sass_gemv.py down   # another Triton (pip install --target),
                                                           # e.g. the GPU machine's 3.6
    MAXNREG=56 python bench/sass_gemv.py gate_up           # ptxas's register cap (spills show as LDL/STL)

The tiles are those `gguf_gemv_plan.choose_gemv_config` and `plan_gemv` give one row at the 8B
shapes on an H200 (132 SMs), as `gguf_gemv_triton._launch` takes them. Checked
against the H200: ncu's SASS of an eager qkv launch there (no PDL; bench/results/ncu-decode-q4_0-
qkv-sass-*.csv) has 434 instructions besides NOPs and this script's with PDL=false PREFETCH=false and
Triton 3.6 has 432, with the same interleaving of code loads and products; Triton 3.9 differs more.
(That was before the tiles became lane-major; bench/NOTES.md, "x loaded once a thread".)
"""
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from replica.kernels import gguf_gemv_plan, gguf_gemv_triton  # noqa: E402

# Llama-3-8B's decode projections (N, K), [gate | up] fused as the model runs it; "head": the output
# head, Q6_K (llama.cpp keeps it so in every format here), the same kernel at 6 bits
PROJECTIONS = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
               "head": (128256, 4096)}
H200_SMS = 132
SIZE_ARGS = ("N", "num_groups", "groups_per_split", "stride_xm", "stride_qn", "stride_sn", "stride_om", "stride_hn")


def h200_plan(proj: str, fmt: str) -> gguf_gemv_plan.GemvPlan:
    """The plan the GEMV takes for one row of x on an H200 (no GPU here: its SM count is given)."""
    n, k = PROJECTIONS[proj]
    gguf_gemv_plan.num_sms = lambda device: H200_SMS      # this process only compiles, for an H200
    packed = SimpleNamespace(shape=(n, k), bits=6 if proj == "head" else 4, qtype="Q6_K" if proj == "head" else fmt)
    return gguf_gemv_plan.plan_gemv(1, packed, torch.device("cuda"), None, x_int8=True)


def compile_projection(proj: str, fmt: str, overrides: dict):
    plan = h200_plan(proj, fmt)
    unrolled = plan.unrolled_tiles(gguf_gemv_plan.MAX_UNROLLED_TILES) if plan.config.unroll else 0
    six_bit = proj == "head"
    is_q4k = fmt == "Q4_K" and not six_bit
    normed = proj in ("qkv", "gate_up")           # x from the RMSNorm that writes int8 x: its 1/rms here
    constexprs = dict(ZERO_POINT=32 if six_bit else 0 if is_q4k else 8, HAS_MIN=is_q4k, HAS_BIAS=False, M=1,
                      BLOCK_N=plan.config.block_n, GROUPS=plan.groups, SPLIT_K=plan.split_k, EVEN_K=plan.even_k,
                      BF16_ASM=0, X8=True, DP4A=True, NUM_PARTS=4 if normed else 0, PARTS=4 if normed else 1,
                      GATED=proj == "gate_up", PDL=True, PREFETCH=True, SIX_BIT=six_bit, SUPER=False, PAIRED=is_q4k,
                      TILES=unrolled, STREAM=gguf_gemv_triton.STREAM_SIX_BIT if six_bit else True) | overrides
    out_type = "*bf16" if plan.split_k == 1 else "*fp32"
    types = dict(x_ptr="*i32", x2_ptr="*i64", q_ptr="*i32", s_ptr="*i32" if is_q4k or six_bit else "*fp16",
                 m_ptr="*fp16", bias_ptr="*bf16", out_ptr=out_type, partial_ptr=out_type, sumsq_ptr="*fp32",
                 h_ptr="*i64" if six_bit else "*i32",
                 eps="fp32", prefetch_programs="i32", one="i32") | {name: "i32" for name in SIZE_ARGS}
    kernel = gguf_gemv_triton._q4_gemv_kernel
    names = kernel.arg_names
    aligned = [name for name, t in types.items() if t.startswith("*") or name in SIZE_ARGS]
    src = ASTSource(fn=kernel, signature={name: types.get(name, "constexpr") for name in names},
                    constexprs={(names.index(key),): value for key, value in constexprs.items()},
                    attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned})
    options = dict(num_warps=plan.config.num_warps, num_stages=1)
    if os.environ.get("MAXNREG"):
        options["maxnreg"] = int(os.environ["MAXNREG"])
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)


def sass(compiled) -> tuple[list[str], str]:
    """The kernel's SASS instructions (no addresses or encodings), and cuobjdump's resource line."""
    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        dump = subprocess.run([tools / "cuobjdump", "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([tools / "cuobjdump", "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
    finally:
        os.unlink(f.name)
    lines = [m.group(1).strip() for m in (re.match(r"\s*/\*[0-9a-f]{4}\*/\s*(.*?);", line)
                                          for line in dump.splitlines()) if m]
    return lines, " ".join(line.strip() for line in usage.splitlines() if "REG" in line)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in PROJECTIONS:
        raise SystemExit(f"usage: bench/sass_gemv.py {{{','.join(PROJECTIONS)}}} [Q4_0|Q4_K] [CONSTEXPR=JSON ...]")
    fmt = sys.argv[2] if len(sys.argv) > 2 and "=" not in sys.argv[2] else "Q4_0"
    overrides = {key: json.loads(value) for key, value in (a.split("=", 1) for a in sys.argv[2:] if "=" in a)}
    lines, usage = sass(compile_projection(sys.argv[1], fmt, overrides))
    fmt = "Q6_K" if sys.argv[1] == "head" else fmt
    print("\n".join(lines))
    real = [line for line in lines if not line.startswith("NOP")]
    first_product = next((i for i, line in enumerate(real) if line.startswith("IDP")), len(real))
    codes = [i for i, line in enumerate(real) if line.startswith("LDG.E.EF")]
    print(f"triton {triton.__version__}, {sys.argv[1]} {fmt}: {usage}; {len(real)} instructions, "
          f"{sum(line.startswith('IDP') for line in real)} dp4a, {len(codes)} evict-first code loads, "
          f"{sum(i < first_product for i in codes)} of them before the first dp4a", file=sys.stderr)


if __name__ == "__main__":
    main()

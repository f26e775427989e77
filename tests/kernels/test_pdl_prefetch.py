"""The packed GEMVs' weight prefetch under PDL (`pdl.prefetch_l2`), checked where it is decided: in
the PTX that Triton compiles for sm_90. Triton compiles offline, so this runs without a GPU (in a
child process: the kernel tests' interpreter is chosen when a kernel module is imported).

The invariant: before `griddepcontrol.wait` a GEMV program may only ask L2 for lines (its weights',
which no kernel writes); every load, of x above all, comes after the wait, because x is what the
kernel before it is still writing."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The child: compile each GEMV for sm_90 with PDL, with and without PREFETCH, and report where in
# the PTX the prefetches, the global loads and the first wait are (line numbers).
CHILD = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from replica.kernels import gguf_gemv_triton as gg, gguf_gemv8_triton as g8

def where(fn, sig, consts, num_warps):
    names = fn.arg_names
    signature = {n: sig.get(n, "constexpr") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig.get(n, "").startswith("*")}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    lines = compiled.asm["ptx"].splitlines()
    find = lambda text: [i for i, line in enumerate(lines) if text in line and not line.lstrip().startswith("//")]
    return {"wait": find("griddepcontrol.wait"), "prefetch": find("prefetch.global.L2"), "load": find("ld.global")}

p = lambda t: "*" + t
common = dict(prefetch_programs="i32", q_ptr=p("i32"), s_ptr=p("fp16"), m_ptr=p("fp16"), bias_ptr=p("bf16"),
              out_ptr=p("bf16"), partial_ptr=p("fp32"), one="i32", stride_xm="i32", stride_qn="i32",
              stride_sn="i32", stride_om="i32")
q4 = dict(common, x_ptr=p("i32"), x2_ptr=p("i64"), sumsq_ptr=p("fp32"), N="i32", num_groups="i32",
          groups_per_split="i32", eps="fp32")
q8 = dict(common, x_ptr=p("bf16"), x32_ptr=p("i32"), N="i32", num_chunks="i32", chunks_per_split="i32")
out = {}
for prefetch in (True, False):
    out[f"q4 gated, int8 x from the norm, prefetch={prefetch}"] = where(gg._q4_gemv_kernel, q4, dict(
        ZERO_POINT=8, HAS_MIN=True, HAS_BIAS=False, M=1, BLOCK_N=2, GROUPS=32, SPLIT_K=1, EVEN_K=False, BF16_ASM=0,
        X8=True, DP4A=True, NUM_PARTS=8, PARTS=8, GATED=True, PDL=True, PREFETCH=prefetch), 1)
    out[f"q8, bf16 x, prefetch={prefetch}"] = where(g8.q8_gemv_kernel, q8, dict(
        CHUNKS_PER_GROUP=2, HAS_MIN=False, HAS_BIAS=False, M=2, BLOCK_N=4, CHUNKS=32, SPLIT_K=1, EVEN_K=True,
        BF16_ASM=True, GATED=False, PDL=True, PREFETCH=prefetch), 4)
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def ptx_positions():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("this Triton has no ptxas to compile for sm_90")
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


def test_a_gemv_asks_l2_for_its_weights_before_its_pdl_wait_and_loads_nothing_before_it(ptx_positions):
    for kernel, at in ptx_positions.items():
        if "prefetch=True" not in kernel:
            continue
        first_wait = min(at["wait"])
        assert at["prefetch"], kernel
        assert max(at["prefetch"]) < first_wait, kernel
        assert at["load"] and min(at["load"]) > first_wait, f"{kernel}: a global load before the PDL wait"


def test_without_prefetch_the_ptx_has_none(ptx_positions):
    for kernel, at in ptx_positions.items():
        if "prefetch=False" in kernel:
            assert at["prefetch"] == [] and at["wait"], kernel

"""What the kernels touch before their PDL wait, checked where it is decided: in the PTX that Triton
compiles for sm_90. Triton compiles offline, so this runs without a GPU (in a child process: the
kernel tests' interpreter is chosen when a kernel module is imported).

The invariants:
- a packed GEMV program may only ask L2 for lines (its weights', which no kernel writes) before
  `griddepcontrol.wait`; every load, of x above all, comes after it, because x is what the kernel
  before it is still writing (loading the first tile of weights into registers before the wait
  was measured and lost 5%: bench/NOTES.md);
- rotary + KV write, decode attention's split and the RMSNorms load before the wait only what no
  kernel of the step writes (`pdl.EARLY_LOADS`): positions, slots, the rotary table; sequence
  lengths and block tables, and attention prefetches K and V; the norm's weight. Which kernel argument a load's address comes from is
  followed through the PTX's registers from the `ld.param` that read it.
Also which loads carry the weights' cache hint (evicted first: the codes and bf16 weights, read once
a step), and that each switch for it reaches the compiled loads."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# The child: compile the kernels for sm_90 with PDL, report where in the PTX the prefetches, the
# global loads and the first wait are, and what the loads before the wait read.
CHILD = r'''
import json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from replica.kernels import gguf_gemv_triton as gg, gguf_gemv8_triton as g8
from replica.kernels import paged_decode_triton as pd, rotary_kv_write_triton as rk

def compile_ptx(fn, sig, consts, num_warps):
    names = fn.arg_names
    signature = {n: sig.get(n, "constexpr") for n in names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if sig.get(n, "").startswith("*")}
    src = ASTSource(fn=fn, signature=signature, attrs=attrs,
                    constexprs={(names.index(k),): v for k, v in consts.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps}).asm["ptx"]

def where(fn, sig, consts, num_warps):
    """Line numbers of the waits, prefetches and global loads, and `early_accesses`."""
    lines = compile_ptx(fn, sig, consts, num_warps).splitlines()
    find = lambda text: [i for i, line in enumerate(lines) if text in line and not line.lstrip().startswith("//")]
    return {"wait": find("griddepcontrol.wait"), "prefetch": find("prefetch.global.L2"), "load": find("ld.global"),
            "early": early_accesses(fn, sig, consts, num_warps),
            "evict_first": find("ld.global.L1::evict_first"), "mma": find("mma")}

p = lambda t: "*" + t
common = dict(prefetch_programs="i32", q_ptr=p("i32"), s_ptr=p("fp16"), m_ptr=p("fp16"), bias_ptr=p("bf16"),
              out_ptr=p("bf16"), partial_ptr=p("fp32"), one="i32", stride_xm="i32", stride_qn="i32",
              stride_sn="i32", stride_om="i32")
q4 = dict(common, x_ptr=p("i32"), x2_ptr=p("i64"), sumsq_ptr=p("fp32"), N="i32", num_groups="i32",
          groups_per_split="i32", eps="fp32")
q8 = dict(common, x_ptr=p("bf16"), x32_ptr=p("i32"), N="i32", num_chunks="i32", chunks_per_split="i32")
def early_accesses(fn, sig, consts, num_warps):
    """Before the first wait: the pointer arguments each global load's and each prefetch's address
    derives from (register data flow from the ld.param of each argument), and the stores."""
    compiled = compile_ptx(fn, sig, consts, num_warps)
    names = [n for n in fn.arg_names if n in sig]
    pointers = {n for n in names if sig[n].startswith("*")}
    lines = compiled.splitlines()
    wait = next(i for i, line in enumerate(lines) if "griddepcontrol.wait" in line)
    taint, found = {}, {"load": [], "prefetch": [], "store": 0}
    for line in lines[:wait]:
        code = re.sub(r"^@!?%\w+\s+", "", line.split("//")[0].strip())
        param = re.match(r"ld\.param\.\w+\s+(%\w+),\s*\[\w+_param_(\d+)\]", code)
        if param:
            index = int(param[2])
            taint[param[1]] = {names[index]} & pointers if index < len(names) else set()
            continue
        regs = re.findall(r"%\w+", code)
        if code.startswith("st.global"):
            found["store"] += 1
        elif code.startswith(("ld.global", "prefetch.global")):
            address = re.search(r"\[\s*(%\w+)", code)[1]
            found["load" if code.startswith("ld") else "prefetch"].append(sorted(taint.get(address, set())))
            for reg in regs:
                if reg != address:
                    taint[reg] = set(taint.get(address, set()))
        elif regs:
            taint[regs[0]] = set().union(*(taint.get(r, set()) for r in regs[1:]))
    return found

out = {}
for prefetch in (True, False):
    for tiles in (0, 4):       # the loop, and 4 tiles unrolled
        out[f"q4 gated, int8 x from the norm, tiles={tiles}, prefetch={prefetch}"] = where(gg._q4_gemv_kernel, q4, dict(
            ZERO_POINT=8, HAS_MIN=True, HAS_BIAS=False, M=1, BLOCK_N=4, GROUPS=32, SPLIT_K=1, EVEN_K=False,
            BF16_ASM=0, X8=True, DP4A=True, NUM_PARTS=8, PARTS=8, GATED=True, PDL=True, PREFETCH=prefetch,
            TILES=tiles, STREAM=gg.STREAM_WEIGHTS), 1)
    out[f"q8, bf16 x, prefetch={prefetch}"] = where(g8.q8_gemv_kernel, q8, dict(
        CHUNKS_PER_GROUP=2, HAS_MIN=False, HAS_BIAS=False, M=2, BLOCK_N=4, CHUNKS=32, SPLIT_K=1, EVEN_K=True,
        BF16_ASM=True, GATED=False, PDL=True, PREFETCH=prefetch), 4)

# the weights' cache hint, each switch on and off (the compiled loads, not the speed)
six = dict(q4, h_ptr=p("i32"), stride_hn="i32", s_ptr=p("i32"))      # 6-bit scales: int32 pairs
from replica.kernels import linear_triton as lt
skinny = dict(x_ptr=p("bf16"), w_ptr=p("bf16"), bias_ptr=p("bf16"), out_ptr=p("bf16"), partial_ptr=p("fp32"),
              M="i32", N="i32", K="i32", k_per_split="i32", stride_xm="i32", stride_wn="i32", stride_om="i32")
for stream in (False, True):
    out[f"hint: q4, stream={stream}"] = where(gg._q4_gemv_kernel, q4, dict(
        ZERO_POINT=8, HAS_MIN=False, HAS_BIAS=False, M=1, BLOCK_N=2, GROUPS=64, SPLIT_K=1, EVEN_K=True,
        BF16_ASM=0, X8=True, DP4A=True, NUM_PARTS=0, PARTS=1, GATED=False, PDL=True, PREFETCH=False,
        TILES=2, STREAM=stream), 1)
    out[f"hint: six-bit, stream={stream}"] = where(gg._q4_gemv_kernel, six, dict(
        ZERO_POINT=32, HAS_MIN=False, HAS_BIAS=False, M=1, BLOCK_N=2, GROUPS=32, SPLIT_K=1, EVEN_K=True,
        BF16_ASM=0, X8=True, DP4A=True, NUM_PARTS=0, PARTS=1, GATED=False, PDL=True, PREFETCH=False,
        SIX_BIT=True, TILES=0, STREAM=stream), 1)
    out[f"hint: q8, stream={stream}"] = where(g8.q8_gemv_kernel, q8, dict(
        CHUNKS_PER_GROUP=2, HAS_MIN=False, HAS_BIAS=False, M=1, BLOCK_N=2, CHUNKS=64, SPLIT_K=1, EVEN_K=True,
        BF16_ASM=True, GATED=False, PDL=True, PREFETCH=False, STREAM=stream), 1)
    out[f"hint: bf16, stream={stream}"] = where(lt._skinny_linear_kernel, skinny, dict(
        HAS_BIAS=False, USE_DOT=False, BLOCK_M=1, BLOCK_N=4, BLOCK_K=2048, SPLIT_K=1, EVEN_N=True, EVEN_K=True,
        DOT_PRECISION="ieee", PDL=True, STREAM=stream, TILES=0), 8)
out["bf16, 2 tiles unrolled"] = where(lt._skinny_linear_kernel, skinny, dict(
    HAS_BIAS=False, USE_DOT=False, BLOCK_M=1, BLOCK_N=4, BLOCK_K=2048, SPLIT_K=1, EVEN_N=True, EVEN_K=True,
    DOT_PRECISION="ieee", PDL=True, STREAM=False, TILES=2), 8)
for tiles in (0, 2):          # several rows of x: the dot path (a kernel that only the GPU compiles)
    out[f"bf16 dot, tiles={tiles}"] = where(lt._skinny_linear_kernel, skinny, dict(
        HAS_BIAS=False, USE_DOT=True, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128, SPLIT_K=1, EVEN_N=True, EVEN_K=True,
        DOT_PRECISION="ieee", PDL=True, STREAM=True, TILES=tiles), 4)

i = "i32"
split = dict(q_ptr=p("bf16"), k_cache_ptr=p("bf16"), v_cache_ptr=p("bf16"), block_tables_ptr=p("i32"),
             seq_lens_ptr=p("i32"), out_ptr=p("bf16"), part_out_ptr=p("fp32"), part_lse_ptr=p("fp32"),
             scale_log2="fp32", num_splits=i, stride_qt=i, stride_qh=i, stride_kb=i, stride_ks=i, stride_kh=i,
             stride_vb=i, stride_vs=i, stride_vh=i, stride_bt=i, stride_ot=i, stride_oh=i, prefetch_programs=i,
             k_new_ptr=p("bf16"), v_new_ptr=p("bf16"), positions_ptr=p("i64"), cos_sin_ptr=p("fp32"),
             slot_mapping_ptr=p("i64"), stride_knt=i, stride_knh=i, stride_vnt=i, stride_vnh=i, stride_cs=i)
for rotary in (False, True):
    out[f"early: decode split, rotary={rotary}"] = early_accesses(pd._decode_split_kernel, split, dict(
        BLOCK_SIZE=16, GROUP_SIZE=4, BLOCK_G=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_N=64, IS_SINGLE_SPLIT=False,
        DOT_PRECISION="ieee", KV_AS_F16=False, PDL=True, EARLY=True, LINE=64, ROTARY=rotary), 4)
rotary = dict(q_ptr=p("bf16"), k_ptr=p("bf16"), v_ptr=p("bf16"), positions_ptr=p("i64"), cos_sin_ptr=p("fp32"),
              q_out_ptr=p("bf16"), k_cache_ptr=p("bf16"), v_cache_ptr=p("bf16"), slot_mapping_ptr=p("i64"),
              stride_qt=i, stride_qh=i, stride_kt=i, stride_kh=i, stride_vt=i, stride_vh=i, stride_cos_sin=i,
              stride_kc_block=i, stride_kc_slot=i, stride_kc_head=i, stride_vc_block=i, stride_vc_slot=i,
              stride_vc_head=i)
out["early: rotary + KV write"] = early_accesses(rk._rotary_kv_write_kernel, rotary, dict(
    NUM_HEADS=32, NUM_KV_HEADS=8, HALF=64, BLOCK_SIZE=16, BLOCK_H=32, BLOCK_KV_H=8, BLOCK_HALF=64, PDL=True,
    EARLY=True), 4)
from replica.kernels import rms_norm_triton as rn, rms_norm_x8_triton as rx
norm = dict(x_ptr=p("bf16"), residual_ptr=p("bf16"), weight_ptr=p("bf16"), out_ptr=p("bf16"),
            residual_out_ptr=p("bf16"), q_ptr=p("bf16"), scale_ptr=p("fp32"), inner=i, stride_x0=i, stride_x1=i,
            stride_r0=i, stride_r1=i, hidden=i, eps="fp32")
out["early: rms_norm"] = early_accesses(rn._rms_norm_kernel, norm, dict(
    HAS_RESIDUAL=True, BLOCK=4096, QUANT=False, FP8_MAX_=448.0, MIN_SCALE_=1e-12, PDL=True, EARLY=True), 8)
norm_x8 = dict(x_ptr=p("bf16"), residual_ptr=p("bf16"), weight_ptr=p("bf16"), residual_out_ptr=p("bf16"),
               codes_ptr=p("i8"), ds_ptr=p("fp32"), sumsq_ptr=p("fp32"), hidden=i, num_groups=i, num_parts=i,
               stride_xm=i, stride_rm=i)
out["early: rms_norm_x8"] = early_accesses(rx._rms_norm_x8_kernel, norm_x8, dict(
    HAS_RESIDUAL=True, GROUPS_=16, PDL=True, EARLY=True, SPLIT_K=0), 4)
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
        assert at["prefetch"] and max(at["prefetch"]) < first_wait, kernel
        assert at["early"]["load"] == [] and at["early"]["store"] == 0, kernel
        for origin in at["early"]["prefetch"]:
            assert set(origin) <= {"q_ptr", "s_ptr", "m_ptr"}, (kernel, origin)
        assert at["load"] and min(at["load"]) > first_wait, f"{kernel}: a global load before the PDL wait"


def test_without_prefetch_the_ptx_has_none(ptx_positions):
    for kernel, at in ptx_positions.items():
        if "prefetch=False" in kernel:
            assert at["prefetch"] == [] and at["wait"], kernel


def test_decode_attention_reads_only_the_host_written_lengths_and_block_table_before_its_wait(ptx_positions):
    found = ptx_positions["early: decode split, rotary=False"]
    assert found["load"] and found["store"] == 0
    for origin in found["load"]:
        assert set(origin) <= {"seq_lens_ptr", "block_tables_ptr"}, origin
    # the first tile's K and V lines are asked of L2, at addresses from the block table; q is untouched
    assert sorted(tuple(o) for o in found["prefetch"]) == [
        ("block_tables_ptr", "k_cache_ptr", "seq_lens_ptr"), ("block_tables_ptr", "seq_lens_ptr", "v_cache_ptr")]


def test_rotary_reads_only_positions_slots_and_its_table_before_its_wait(ptx_positions):
    found = ptx_positions["early: rotary + KV write"]
    assert found["store"] == 0 and not found["prefetch"]
    origins = {tuple(o) for o in found["load"]}
    assert {("positions_ptr",), ("slot_mapping_ptr",)} <= origins, origins
    assert all(set(o) <= {"positions_ptr", "slot_mapping_ptr", "cos_sin_ptr"} for o in origins), origins
    assert any("cos_sin_ptr" in o for o in origins), origins


def test_the_norms_read_only_their_weight_before_their_wait(ptx_positions):
    for kernel in ("early: rms_norm", "early: rms_norm_x8"):
        found = ptx_positions[kernel]
        assert found["load"] and found["store"] == 0 and not found["prefetch"], kernel
        assert all(o == ["weight_ptr"] for o in found["load"]), (kernel, found["load"])


def test_decode_attention_with_rotary_reads_positions_slots_and_the_table_before_its_wait_not_q_k_v(ptx_positions):
    found = ptx_positions["early: decode split, rotary=True"]
    assert found["store"] == 0
    origins = {tuple(o) for o in found["load"]}
    assert ("positions_ptr",) in origins and ("slot_mapping_ptr",) in origins, origins
    allowed = {"seq_lens_ptr", "block_tables_ptr", "positions_ptr", "slot_mapping_ptr", "cos_sin_ptr"}
    assert all(set(o) <= allowed for o in origins), origins


def test_the_int8_x_gemvs_code_loads_are_evicted_first(ptx_positions):
    # the codes are read once a step, x by every program: the codes make way first in L1 and L2
    # (W2 Q4_0 +1.2%: bench/NOTES.md, "Weights evicted first"); the other loads keep no hint
    for kernel, at in ptx_positions.items():
        if kernel.startswith("q4 gated"):
            assert at["evict_first"], kernel
            assert len(at["load"]) > len(at["evict_first"]), f"{kernel}: x's and the scales' loads evicted first too"


def test_each_weights_hint_switch_reaches_the_compiled_loads(ptx_positions):
    for kind in ("q4", "six-bit", "q8", "bf16"):
        on, off = ptx_positions[f"hint: {kind}, stream=True"], ptx_positions[f"hint: {kind}, stream=False"]
        assert on["evict_first"] and not off["evict_first"], kind
        assert len(on["load"]) == len(off["load"]), kind          # the same loads, only hinted


def test_bf16s_unrolled_tiles_are_straight_line_code(ptx_positions):
    # the loop's body loads one tile; two unrolled tiles load twice as much, with no loop around
    assert len(ptx_positions["bf16, 2 tiles unrolled"]["load"]) == 2 * len(ptx_positions["hint: bf16, stream=False"]["load"])


def test_the_bf16_gemv_for_several_rows_of_x_compiles_to_tensor_core_products(ptx_positions):
    # the dot path runs only on a GPU (the interpreter executes Python, which compiled a helper that
    # Triton itself rejected for this specialisation: the tests passed while the GPU failed)
    for tiles in (0, 2):
        assert ptx_positions[f"bf16 dot, tiles={tiles}"]["mma"]
    assert not ptx_positions["hint: bf16, stream=False"]["mma"]

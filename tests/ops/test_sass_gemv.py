"""bench/sass_gemv.py: the 4-bit decode GEMV compiled offline for sm_90, read back as SASS (in a child
process: the kernel tests may have imported the kernels under Triton's interpreter). The child takes
this process's environment: with PYTHONPATH pointing at another Triton (e.g. the GPU machine's 3.6,
`pip install --target`), these checks run against that version's compiler. Triton 3.6 and 3.9 lay
out tied dimensions differently (bench/NOTES.md, "x loaded once a thread"), and both pass."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _sass(*args: str) -> tuple[list[str], str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "bench/sass_gemv.py", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300, check=True)
    return done.stdout.splitlines(), done.stderr


def test_qkv_sass_has_a_dp4a_per_4_codes_and_the_code_loads_hint_as_asked():
    # one warp, 2 rows x 128 groups of 32 codes: 8 groups a lane, 8 dp4a a group
    lines, summary = _sass("qkv")
    assert sum(line.startswith("IDP.4A") for line in lines) == 64
    assert sum(line.startswith("LDG.E.EF.128") for line in lines) == 8       # codes, evicted first
    assert "qkv Q4_0: REG:" in summary and "64 dp4a, 8 evict-first code loads" in summary
    plain, _ = _sass("qkv", "STREAM=false")
    assert not any(line.startswith("LDG.E.EF") for line in plain)


def test_gate_up_threads_load_their_lane_of_x_once_for_all_four_rows_without_shared_memory():
    # gate_up: one warp, 4 rows x 32 groups, 4 tiles along K = 4,096. Lane-major tiles give a thread
    # one group of all 4 rows, so per tile it loads its 4 rows' codes and scales but x once:
    # 2 x 16 bytes of int8 codes and one (dx, xsum). Row-major tiles loaded x once a row (32 + 16).
    lines, _ = _sass("gate_up")
    assert sum(line.startswith("LDG.E.EF.128") for line in lines) == 16       # codes: 4 tiles x 4 rows
    assert sum(line.startswith("LDG.E.128") for line in lines) == 8           # x's codes: 4 tiles x 2
    assert sum(line.startswith("LDG.E.64") for line in lines) == 4            # x's (dx, xsum): 4 tiles
    # the loads' layouts agree, so no layout conversion goes through shared memory or shuffles
    assert not any(line.startswith(("LDS", "STS", "STSM", "BAR", "SHFL.IDX")) for line in lines)


def test_the_six_bit_head_loads_x_once_a_lane_without_layout_conversions():
    # the Q6_K head: one warp, 2 rows x 32 lanes, its 4 tiles along K in a loop; a loop iteration
    # loads each row's codes, top bits and scales, and x once. Its 24 dp4a: 8 for each row's
    # products, and 8 for x's sums, which both rows share
    lines, summary = _sass("head")
    assert "head Q6_K: REG:" in summary
    assert sum(line.startswith("IDP.4A") for line in lines) == 24
    assert sum(line.startswith("LDG.E.128") for line in lines) == 2 + 2        # 2 rows' codes, x's 2 halves
    assert not any(line.startswith(("LDS", "STS", "STSM", "BAR", "SHFL.IDX")) for line in lines)

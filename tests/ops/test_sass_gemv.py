"""bench/sass_gemv.py: the 4-bit decode GEMV compiled offline for sm_90, read back as SASS (in a child
process: the kernel tests may have imported the kernels under Triton's interpreter)."""
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
    assert "qkv Q4_0: REG:" in summary and "64 dp4a, 8 code loads" in summary
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

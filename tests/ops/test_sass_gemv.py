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

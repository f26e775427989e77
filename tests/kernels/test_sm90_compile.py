"""Every kernel specialisation this run's tests launched through the interpreter also compiles for
a GPU (sm_90, offline: no GPU needed). Runs after every other test (`runs_last`), over what they
recorded (`sm90_specs`); alone, or on a machine that compiles for its GPU, it has nothing to check."""
import os

import pytest
import torch

from tests.kernels import sm90_specs


@pytest.mark.runs_last
def test_every_kernel_the_interpreter_ran_compiles_for_sm90():
    specs = sorted(sm90_specs.recorded)
    if not specs:
        pytest.skip("no interpreted launch was recorded in this run (GPU machine, or this test alone)")
    failures = sm90_specs.compile_all(specs)
    assert not failures, f"{len(failures)} of {len(specs)} specialisations fail to compile:\n" + "\n\n".join(failures)


def test_the_compile_check_reports_what_the_interpreter_runs_but_triton_rejects():
    # a constexpr branch's early return followed by code that does not type-check for that branch
    if os.environ.get("TRITON_INTERPRET") == "1":
        from tests.kernels.sm90_fixtures import early_return_kernel
        out = torch.empty(16)
        early_return_kernel[(1,)](out, BLOCK=16, TWO_D=True)
        assert torch.equal(out, 32 * torch.arange(16.0))            # the interpreter runs it
    spec = ('["tests.kernels.sm90_fixtures", "early_return_kernel", {"out_ptr": "*fp32"}, '
            '{"BLOCK": 16, "TWO_D": true}, {"num_warps": 1}]')
    good = spec.replace('"TWO_D": true', '"TWO_D": false')
    failures = sm90_specs.compile_all([spec, good], workers=1)
    assert len(failures) == 1 and "early_return_kernel" in failures[0] and '"TWO_D": true' in failures[0]

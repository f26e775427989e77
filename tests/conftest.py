"""Suite-wide switches.

Tests marked `slow` (soaks, long end-to-end runs) are skipped unless asked for with `--run-slow`
or PAGEFLEET_RUN_SLOW=1: CI runs the fast suite on 2 cores; the slow ones are run by hand or on
bigger machines. Tests marked `gpu` skip themselves without CUDA.

Replica's tokenizer cache (`replica/models/tokenizer_cache.py`) lives in a folder of this run,
not in the home's ~/.cache, unless PAGEFLEET_CACHE_DIR is set: its first GGUF server builds the
bundled model's tokenizer, the later ones load it.
"""
import os
import shutil
import tempfile

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


_RUN_CACHE: list[str] = []


def pytest_configure(config):
    if "PAGEFLEET_CACHE_DIR" not in os.environ:
        _RUN_CACHE.append(tempfile.mkdtemp(prefix="pagefleet-cache-"))
        os.environ["PAGEFLEET_CACHE_DIR"] = _RUN_CACHE[0]


def pytest_unconfigure(config):
    for folder in _RUN_CACHE:
        shutil.rmtree(folder, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    # the sm_90 compile check runs last: it compiles what every earlier test's kernels launched
    last = [item for item in items if item.get_closest_marker("runs_last")]
    items[:] = [item for item in items if not item.get_closest_marker("runs_last")] + last
    if config.getoption("--run-slow") or os.environ.get("PAGEFLEET_RUN_SLOW", "") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or PAGEFLEET_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

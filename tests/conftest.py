"""Suite-wide switches.

Tests marked `slow` (soaks, long end-to-end runs) are skipped unless asked for with `--run-slow`
or PAGEFLEET_RUN_SLOW=1: CI runs the fast suite on 2 cores; the slow ones are run by hand or on
bigger machines. Tests marked `gpu` skip themselves without CUDA.
"""
import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow") or os.environ.get("PAGEFLEET_RUN_SLOW", "") not in ("", "0"):
        return
    skip = pytest.mark.skip(reason="slow: run with --run-slow or PAGEFLEET_RUN_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)

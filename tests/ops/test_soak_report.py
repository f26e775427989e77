"""bench/soak.py's verdict: errors, RSS (and GPU memory) drift after warm-up, residue at the end."""
from bench.soak import Sample, SoakReport


def report_with(rss_mb: list[int], gpu_mb: list[int] | None = None, **fields) -> SoakReport:
    report = SoakReport(duration_s=100.0, concurrency=4, end_running={"r1": 0.0}, end_kv_usage={"r1": 0.0}, **fields)
    for i, rss in enumerate(rss_mb):
        gpu = (gpu_mb or [0] * len(rss_mb))[i]
        report.samples.append(Sample(i * 100 / len(rss_mb), {"r1": rss << 20}, {"r1": gpu << 20}, {"r1": 1}, {"r1": 0.1}))
    return report


def test_rss_that_grows_only_during_warm_up_passes():
    assert report_with([500, 800, 1000, 1000, 1001, 1000, 1002, 1003, 1010, 1012]).problems() == []


def test_rss_that_keeps_growing_after_warm_up_fails_with_its_drift():
    assert report_with([500, 800, 1000, 1000, 1001, 1010, 1020, 1030, 1040, 1050]).problems() == \
        ["r1: RSS drifted +3.9%"]  # median 1040 over median 1001


def test_gpu_memory_growth_errors_and_residue_each_fail():
    flat = [1000] * 10
    assert report_with(flat, gpu_mb=[70000] * 7 + [72000] * 3).problems() == ["r1: GPU memory drifted +2.9%"]
    assert report_with(flat, errors={"500: boom": 2}).problems() == ["2 requests failed: {'500: boom': 2}"]
    leftover = report_with(flat)
    leftover.end_running, leftover.end_kv_usage = {"r1": 3.0}, {"r1": 0.25}
    assert leftover.problems() == ["r1: 3 requests still running", "r1: KV cache 25.0% used at the end"]
    assert report_with([1000] * 3).problems() == ["too few samples after warm-up to judge RSS"]

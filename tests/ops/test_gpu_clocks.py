"""bench/gpu_clocks.py: nvidia-smi's sampled lines parsed and summarised (the lines below are its
`--format=csv,noheader,nounits` output for FIELDS), and the sampler itself on this machine."""
import shutil
import time

from bench.gpu_clocks import GpuClocks, parse_line, summarise


def test_a_sample_line_is_parsed_and_cut_or_unavailable_lines_are_dropped():
    assert parse_line("1980, 3201, 52, 611.27, 0x0000000000000004") == {
        "sm_MHz": 1980, "mem_MHz": 3201, "temp_C": 52, "power_W": 611.27, "reasons": 4}
    assert parse_line("1980, 3201, 52, [N/A], 0x0000000000000000") is None
    assert parse_line("clocks.current.sm [MHz], clocks.current.memory [MHz]") is None
    assert parse_line("1980, 32") is None


def test_the_summary_gives_the_clock_range_and_every_reason_seen():
    samples = [parse_line(line) for line in ("1980, 3201, 50, 600.0, 0x0000000000000000",
                                             "1755, 3201, 58, 700.5, 0x0000000000000004",
                                             "1410, 3201, 61, 690.0, 0x0000000000000024")]
    assert summarise(samples) == {"num_samples": 3, "sm_MHz_min": 1410, "sm_MHz_median": 1755, "sm_MHz_max": 1980,
                                  "mem_MHz_min": 3201, "temp_C_max": 61, "power_W_max": 700.5,
                                  "event_reasons": ["sw_power_cap", "sw_thermal_slowdown"]}
    assert summarise([]) is None


def test_the_sampler_reports_what_this_machine_has():
    with GpuClocks(interval_ms=50) as clocks:
        time.sleep(0.3)
    if shutil.which("nvidia-smi") is None:
        assert clocks.summary() is None
    else:
        assert clocks.summary()["num_samples"] >= 1

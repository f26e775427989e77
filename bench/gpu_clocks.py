"""What the GPU's clocks did while a measurement ran: `nvidia-smi` sampling every 50 ms in a child
process (`GpuClocks`, a context manager), summarised as the SM and memory clock range, the peak
temperature and power, and every clock event reason seen (power cap, thermal or power-brake
slowdown...). A W2 run lasts 0.2-0.5 s: a figure far from its neighbours with a lower SM clock or a
slowdown reason is the GPU's doing, not the code's. Without nvidia-smi the summary is None.

    with GpuClocks() as clocks:
        tok_per_s = measure()
    figures["gpu_clocks"] = clocks.summary()
"""
import functools
import shutil
import statistics
import subprocess

FIELDS = "clocks.sm,clocks.mem,temperature.gpu,power.draw,{reasons}.active"
# nvmlClocksEventReason bits (nvml.h); 0x1 (idle) and 0x4 (the power cap) are routine under load
EVENT_REASONS = {0x1: "gpu_idle", 0x2: "applications_clocks_setting", 0x4: "sw_power_cap",
                 0x8: "hw_slowdown", 0x10: "sync_boost", 0x20: "sw_thermal_slowdown",
                 0x40: "hw_thermal_slowdown", 0x80: "hw_power_brake_slowdown", 0x100: "display_clock_setting"}


def parse_line(line: str) -> dict | None:
    """One `--format=csv,noheader,nounits` line of FIELDS → a sample, or None (a header, a
    "[N/A]" field, a line cut off when the sampler stopped)."""
    parts = [part.strip() for part in line.split(",")]
    if len(parts) != 5:
        return None
    try:
        return {"sm_MHz": int(parts[0]), "mem_MHz": int(parts[1]), "temp_C": int(parts[2]),
                "power_W": float(parts[3]), "reasons": int(parts[4], 16)}
    except ValueError:
        return None


def summarise(samples: list[dict]) -> dict | None:
    if not samples:
        return None
    sm = [s["sm_MHz"] for s in samples]
    seen = 0
    for sample in samples:
        seen |= sample["reasons"]
    return {"num_samples": len(samples), "sm_MHz_min": min(sm), "sm_MHz_median": statistics.median(sm),
            "sm_MHz_max": max(sm), "mem_MHz_min": min(s["mem_MHz"] for s in samples),
            "temp_C_max": max(s["temp_C"] for s in samples), "power_W_max": max(s["power_W"] for s in samples),
            "event_reasons": [name for bit, name in EVENT_REASONS.items() if seen & bit]}


@functools.cache
def _reasons_field() -> str:
    """The event reasons' field name: drivers from R535 on; older ones know only the old name."""
    probe = subprocess.run(["nvidia-smi", "--query-gpu=clocks_event_reasons.active", "--format=csv,noheader"],
                           capture_output=True, text=True)
    return "clocks_event_reasons" if probe.returncode == 0 else "clocks_throttle_reasons"


class GpuClocks:
    def __init__(self, gpu_index: int = 0, interval_ms: int = 50):
        self.gpu_index, self.interval_ms = gpu_index, interval_ms
        self.process: subprocess.Popen | None = None
        self.output = ""

    def __enter__(self) -> "GpuClocks":
        if shutil.which("nvidia-smi"):
            command = ["nvidia-smi", f"--query-gpu={FIELDS.format(reasons=_reasons_field())}",
                       "--format=csv,noheader,nounits", f"--id={self.gpu_index}", f"--loop-ms={self.interval_ms}"]
            self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        return self

    def __exit__(self, *exc) -> None:
        if self.process is not None:
            self.process.terminate()
            self.output, _ = self.process.communicate(timeout=10)

    def summary(self) -> dict | None:
        return summarise([s for s in map(parse_line, self.output.splitlines()) if s is not None])

"""bench/vs_llamacpp.py's report: the facts it records (device, load, versions, build flags, the
GGUF's tensor types), the ratios pagefleet / llama.cpp, the Markdown table and the PNG."""
from __future__ import annotations

import os
import platform
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVERS = ("ollama_defaults", "llamacpp_best", "pagefleet")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name()
    return cpu_model()


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def git_commit() -> str:
    """"unknown" outside a git checkout, or where git is not installed (a minimal Debian)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT)
    except OSError:
        return "unknown"
    return out.stdout.strip() or "unknown"


def llama_server_version(binary: str) -> str:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60)
    return (out.stdout + out.stderr).strip()


def llama_build_flags(binary: str) -> dict[str, str]:
    """The build choices that change speed, read from the CMake cache of the binary's build folder."""
    keys = re.compile(r"^(CMAKE_BUILD_TYPE|CMAKE_CUDA_ARCHITECTURES|CMAKE_C_COMPILER|BUILD_SHARED_LIBS|"
                      r"GGML_(CUDA|NATIVE|AVX\w*|F16C|FMA|BLAS|CUDA_\w+|CPU\w*|OPENMP|METAL|VULKAN)):\w+=(.*)$")
    for folder in Path(binary).resolve().parents[:3]:
        cache = folder / "CMakeCache.txt"
        if cache.is_file():
            return {m.group(1): m.group(3) for line in cache.read_text().splitlines() if (m := keys.match(line))}
    return {}


def gguf_facts(path: Path) -> dict:
    """File type and vocabulary size of a GGUF (needs the `gguf` package; {} without it)."""
    try:
        import gguf
    except ImportError:
        return {"size_bytes": path.stat().st_size}
    reader = gguf.GGUFReader(str(path))
    types: dict[str, int] = {}
    for tensor in reader.tensors:
        types[tensor.tensor_type.name] = types.get(tensor.tensor_type.name, 0) + 1
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    return {"size_bytes": path.stat().st_size, "tensor_types": types,
            "vocab_size": len(tokens.data) if tokens else None}


def ratios(servers: dict) -> dict:
    """pagefleet / each llama.cpp configuration, per workload and figure."""
    figures = ("req_per_s", "out_tok_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99")
    out: dict = {}
    pf = servers.get("pagefleet", {}).get("runs", {})
    for other in ("ollama_defaults", "llamacpp_best"):
        for wname, row in servers.get(other, {}).get("runs", {}).items():
            mine = pf.get(wname)
            if not mine or "skipped" in row or "skipped" in mine:
                continue
            out.setdefault(f"pagefleet_over_{other}", {})[wname] = {
                f: round(mine[f] / row[f], 2) if mine.get(f) and row.get(f) else None for f in figures}
    return out


def print_table(results: dict) -> None:
    servers = results["servers"]
    cols = ("req_per_s", "out_tok_per_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99")
    print("| workload | server | n | " + " | ".join(cols) + " |")
    print("|" + " --- |" * (len(cols) + 3))
    for w in results["workloads"]:
        for s, data in servers.items():
            row = data["runs"].get(w, {})
            if "skipped" in row:
                print(f"| {w} | {s} | - | " + " | ".join("not run" for _ in cols) + " |")
            elif row:
                print(f"| {w} | {s} | {row.get('num_requests', '-')} | "
                      + " | ".join(str(row.get(c, '-')) for c in cols) + " |")


def write_png(path: Path, results: dict) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no PNG: matplotlib is not installed", flush=True)
        return
    servers = {k: results["servers"][k] for k in SERVERS if k in results["servers"]}
    names = results["workloads"]
    panels = (("out_tok_per_s", "output tokens/s (higher is better)"),
              ("ttft_ms_p50", "TTFT p50, ms (log)"), ("itl_ms_p50", "ITL p50, ms (log)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.2))
    width = 0.8 / len(servers)
    for ax, (fig_key, title) in zip(axes, panels):
        has_values = False
        for i, (s, data) in enumerate(servers.items()):
            vals = [data["runs"].get(w, {}).get(fig_key) or 0 for w in names]
            has_values |= any(vals)
            ax.bar([x + i * width for x in range(len(names))], vals, width, label=s)
        ax.set_xticks([x + width * (len(servers) - 1) / 2 for x in range(len(names))], names)
        ax.set_title(title, fontsize=10)
        if fig_key != "out_tok_per_s" and has_values:     # a log axis needs a positive value
            ax.set_yscale("log")
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=len(servers), fontsize=8)
    env = results["env"]
    fig.suptitle(f"pagefleet vs llama-server, {env['model_name']} on {env['device_name']} ({env['date']})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)

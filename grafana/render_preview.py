"""Render a dashboard's panels from a live Prometheus into one PNG (a preview without Grafana).

    python grafana/render_preview.py --prometheus http://127.0.0.1:9090 --minutes 5 \\
        --out grafana/preview-fleet.png

Each time-series and stat panel of the generated dashboard becomes a small chart of the same
PromQL over the last `--minutes`, with the variables on "All"; rows and the state timeline are
drawn as plain series. Needs matplotlib.
"""
import argparse
import json
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # run from a checkout

from fleetctl.dashboards import DASHBOARDS, expand_variables  # noqa: E402

_UNIT_SCALE = {"s": (1e3, "ms"), "percentunit": (100.0, "%"), "reqps": (1.0, "req/s")}


def query_range(prometheus: str, expr: str, start_s: float, end_s: float, step_s: float) -> list[dict]:
    params = urllib.parse.urlencode({"query": expr, "start": start_s, "end": end_s, "step": step_s})
    with urllib.request.urlopen(f"{prometheus}/api/v1/query_range?{params}", timeout=30) as resp:
        body = json.loads(resp.read())
    if body["status"] != "success":
        raise RuntimeError(f"Prometheus refused {expr!r}: {body.get('error')}")
    return body["data"]["result"]


def legend(series: dict, legend_format: str) -> str:
    if legend_format in ("", "__auto"):
        return ",".join(f"{k}={v}" for k, v in series["metric"].items() if k != "__name__") or "value"
    text = legend_format
    for key, value in series["metric"].items():
        text = text.replace("{{" + key + "}}", value)
    return text


def render(dashboard: dict, prometheus: str, minutes: float, out: Path, rate_interval: str,
           end_s: float | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in dashboard["panels"] if p.get("targets")]
    end_s = end_s or time.time()
    start_s, step_s = end_s - minutes * 60, max(1.0, minutes * 60 / 200)
    columns = 4
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.6 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        unit = panel["fieldConfig"]["defaults"].get("unit", "short")
        scale, label = _UNIT_SCALE.get(unit, (1.0, ""))
        for target in panel["targets"]:
            expr = expand_variables(target["expr"], rate_interval)
            for series in query_range(prometheus, expr, start_s, end_s, step_s):
                times = [float(t) - end_s for t, _ in series["values"]]
                values = [float(v) * scale for _, v in series["values"]]
                ax.plot(times, values, label=legend(series, target["legendFormat"]), linewidth=1.2)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_ylabel(label, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6, loc="upper left")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(f"{dashboard['title']} ({minutes:g} min; x: seconds before the end)", fontsize=12)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prometheus", required=True, help="Prometheus base URL")
    parser.add_argument("--dashboard", choices=sorted(DASHBOARDS), default="pagefleet-fleet.json")
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--rate-interval", default="30s", help="what $__rate_interval stands for")
    parser.add_argument("--end", type=float, help="end of the window, Unix seconds (default: now)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    render(DASHBOARDS[args.dashboard](), args.prometheus.rstrip("/"), args.minutes, args.out, args.rate_interval,
           args.end)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

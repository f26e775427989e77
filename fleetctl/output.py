"""What fleetctl prints: the progress display, the status table, the `up` summary with examples."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from fleetctl.state import StateDir


def version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("pagefleet")
    except importlib.metadata.PackageNotFoundError:
        return "0.1.0 (source tree)"


@contextmanager
def ready_progress(console: Console, num_wanted: int) -> Iterator[Callable[[int, int], None]]:
    """A bar of ready replicas; yields progress(num_ready, num_wanted)."""
    with Progress(SpinnerColumn(), TextColumn("replicas ready"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("ready", total=num_wanted, completed=0)

        def progress(num_ready: int, num_total: int) -> None:
            bar.update(task, completed=min(num_ready, num_total), total=num_total)

        yield progress


@contextmanager
def update_progress(console: Console, num_total: int) -> Iterator[Callable[[int, int], None]]:
    """A bar of replicas moved to the new weights; yields progress(num_done, num_total)."""
    with Progress(SpinnerColumn(), TextColumn("replicas updated"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False) as bar:
        task = bar.add_task("updated", total=num_total, completed=0)

        def progress(num_done: int, num_total: int) -> None:
            bar.update(task, completed=min(num_done, num_total), total=num_total)

        yield progress


def print_status(console: Console, report: dict) -> None:
    table = Table(title=f"fleet {report['fleet_id']} · {report['backend']} · {report['model']} · "
                        f"{report['num_replicas_ready']}/{report['num_replicas_wanted']} ready",
                  title_justify="left")
    has_groups = len(report.get("groups", [])) > 1
    for column in ("group",) * has_groups + ("id", "address", "model", "weights", "gpu", "ready", "nginx", "run",
                                             "wait", "kv", "up", "restarts", "note"):
        table.add_column(column, justify="right" if column in ("run", "wait", "kv", "restarts") else "left")
    for row in report["replicas"]:
        table.add_row(
            *(row["group"],) * has_groups,
            row["id"], row["address"], row["model"], Path(row["weights"]).name, row["gpu"] or "cpu",
            "[green]yes[/]" if row["is_ready"] else "[red]no[/]",
            "in" if row["in_nginx"] else row["phase"],
            _num(row["num_requests_running"]), _num(row["num_requests_waiting"]),
            "-" if row["kv_cache_usage"] is None else f"{100 * row['kv_cache_usage']:.0f}%",
            _duration(row["uptime_s"]), str(row["num_restarts"]),
            "" if row["is_ready"] else row["reason"],
        )
    console.print(table)
    if report.get("update"):
        console.print(_update_line(report["update"]), highlight=False)
    nginx = report["nginx"]
    if nginx["is_running"]:
        extra = f", {nginx['num_active_connections']} active connection(s)" \
            if nginx.get("num_active_connections") is not None else ""
        console.print(f"NGINX [green]running[/] (pid {nginx['pid']}), {nginx['num_upstreams']} upstream(s){extra}; "
                      f"{report['url']}  internal {nginx['internal_url']}", highlight=False)
    else:
        console.print("NGINX [red]not running[/]; `fleetctl up` starts it", highlight=False)


def _update_line(update: dict) -> str:
    """Where the last rolling update stands, in one line."""
    target = Path(update["target_model"]).name
    counts = f"{update['num_done']}/{update['num_total']} replicas"
    if update["is_running"]:
        return f"update to {target}: [yellow]{update['phase'].replace('_', ' ')}[/], {counts}; {update['step']}"
    if update["is_interrupted"]:
        return (f"update to {target}: [red]interrupted[/] at {counts} ({update['step']}); "
                f"run `fleetctl update --model {update['target_model']}` again to resume")
    if update["phase"] == "done":
        return f"update to {target}: [green]done[/], {counts}"
    return f"update to {target}: [red]{update['phase'].replace('_', ' ')}[/] ({update['reason']})"


def examples(state_dir: StateDir, report: dict) -> dict:
    """A curl and an openai-client example that work as printed (given the API key in
    $PAGEFLEET_API_KEY when the fleet has keys)."""
    import json as _json

    from fleetctl.tls import planned_paths

    config = state_dir.load().config
    url, model = report["url"], report["model"]
    ca = planned_paths(state_dir.tls_dir, config.tls_cert, config.tls_key).ca
    key_env = "$PAGEFLEET_API_KEY" if config.api_keys else "none"
    body = _json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello!"}], "stream": True})
    curl = (f"curl -N {'--cacert ' + str(ca) + ' ' if ca else ''}{url}/v1/chat/completions "
            f"-H 'Content-Type: application/json' "
            + (f'-H "Authorization: Bearer {key_env}" ' if config.api_keys else "") + f"-d '{body}'")
    verify = f'ssl.create_default_context(cafile="{ca}")' if ca else "True"
    key = 'os.environ["PAGEFLEET_API_KEY"]' if config.api_keys else '"none"'
    python = f'''import os, ssl
import httpx
from openai import OpenAI

client = OpenAI(base_url="{url}/v1", api_key={key},
                http_client=httpx.Client(verify={verify}))
stream = client.chat.completions.create(
    model="{model}", messages=[{{"role": "user", "content": "Say hello!"}}], stream=True)
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
print()
'''
    return {"curl": curl, "python": python, "ca": str(ca) if ca else None}


def print_up(console: Console, state_dir: StateDir, report: dict) -> None:
    ex = examples(state_dir, report)
    console.print(f"[bold green]✓[/] {report['num_replicas_ready']}/{report['num_replicas_wanted']} replica(s) of "
                  f"[bold]{report['model']}[/] ready on {report['backend']}, behind NGINX with TLS", highlight=False)
    console.print(f"  URL       [bold]{report['url']}[/]", highlight=False)
    console.print(f"  internal  {report['nginx']['internal_url']}  (/metrics, /health, /stub_status; "
                  "loopback only)", highlight=False)
    if ex["ca"]:
        console.print(f"  CA        {ex['ca']}  (trust it, or pass it to your client)", highlight=False)
    if state_dir.load().config.api_keys:
        console.print("  API key   export PAGEFLEET_API_KEY=<one of your --api-key values>", highlight=False)
    console.print("\n[bold]curl[/]", highlight=False)
    console.print(ex["curl"], highlight=False, soft_wrap=True)
    console.print("\n[bold]openai[/] (Python)", highlight=False)
    console.print(ex["python"], highlight=False, soft_wrap=True)
    console.print("Next: `fleetctl status`, `fleetctl scale N`, `fleetctl watch`, `fleetctl down`.", highlight=False)


def _num(value) -> str:
    return "-" if value is None else f"{value:g}"


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{(seconds % 3600) // 60:02d}m"

"""`follow_file`: the last lines of a log file, then (with follow) each new line as it is written;
what `fleetctl logs` prints for NGINX, the fleet's events and local replicas."""
from __future__ import annotations

import time
from pathlib import Path
from typing import Iterator

FOLLOW_POLL_S = 0.2


def follow_file(path: Path, follow: bool = False, tail: int = 200) -> Iterator[str]:
    """Lines without their newline; nothing when the file does not exist. With follow it runs
    until the caller stops iterating (Ctrl-C in the CLI)."""
    if not path.exists():
        return
    with open(path, errors="replace") as handle:
        yield from (line.rstrip("\n") for line in handle.readlines()[-tail:] if tail > 0)
        while follow:
            line = handle.readline()
            if line:
                yield line.rstrip("\n")
            else:
                time.sleep(FOLLOW_POLL_S)

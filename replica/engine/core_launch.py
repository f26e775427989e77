"""Starting the engine core's process (`core_proc.py`) and its two sockets, without importing torch.

`replica serve` starts the core first thing, so that the core's imports (torch, the model code:
about 3 s on 2 CPU cores) run while the server process imports its own; `AsyncEngine` then sends
it the `CoreStart` and waits for the model. Before, the server spawned the core only after its
own imports, and a replica's start paid both in turn.
"""
import os
import shutil
import subprocess
import sys
import tempfile

import zmq


class CoreLaunch:
    """A started core process that waits for its `CoreStart` on `to_core`; its outputs come on
    `from_core`. The server process binds both sockets (ipc, in a private temporary folder)."""

    def __init__(self, is_omp_passive: bool):
        """is_omp_passive: the CPU device, where two processes share the cores. OpenMP workers
        that spin at barriers (libgomp's default) starve the server's event loop and each other;
        passive workers sleep. It must be set before the core imports torch."""
        self.is_closed = False
        self.ipc_dir = tempfile.mkdtemp(prefix="pagefleet-core-")
        input_addr, output_addr = f"ipc://{self.ipc_dir}/in", f"ipc://{self.ipc_dir}/out"
        self.zmq = zmq.Context()
        self.to_core = self.zmq.socket(zmq.PUSH)
        self.to_core.setsockopt(zmq.SNDHWM, 0)
        self.to_core.setsockopt(zmq.LINGER, 0)
        self.to_core.bind(input_addr)
        self.from_core = self.zmq.socket(zmq.PULL)
        self.from_core.setsockopt(zmq.LINGER, 0)
        self.from_core.bind(output_addr)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if is_omp_passive:
            env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "replica.engine.core_proc", input_addr, output_addr],
            stdin=subprocess.DEVNULL, env=env)

    def close(self) -> None:
        """Closes the sockets and removes their folder (the process is the caller's to end)."""
        if self.is_closed:
            return
        self.is_closed = True
        self.to_core.close(linger=0)
        self.from_core.close(linger=0)
        self.zmq.term()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    def kill(self) -> None:
        """Ends the process (if it still runs) and closes the sockets; safe to call again."""
        self.process.kill()
        self.process.wait()
        self.close()

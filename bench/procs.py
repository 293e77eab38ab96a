"""Processes the harness starts: free ports, readiness, memory from /proc, stopping.

Every process runs in a session of its own (so a Ctrl-C at the terminal reaches only
the harness, which then stops them) with its output in a file of the run's temp dir.
`Proc.stop()` ends the process and anything it forked, by its process group.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def find_tool(name: str) -> str | None:
    """A program on PATH, or in the sbin directories Debian puts daemons in."""
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin:/usr/local/sbin"
    return shutil.which(name, path=path)


def fd_limit() -> int:
    """This process's open-file limit (the harness raised it; children inherit it)."""
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    """One started program; `name` names its output file in `workdir`."""

    def __init__(self, name: str, argv: list[str], workdir: Path, env=None, cwd=None):
        self.name = name
        self.out_path = workdir / f"{name}.out"
        self._out = open(self.out_path, "ab")
        self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, cwd=cwd or ROOT, env=env,
                                     start_new_session=True)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = 5) -> str:
        self._out.flush()
        text = self.out_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def wait_port(self, port: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: "
                                   f"{self.tail()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} did not open port {port} in {timeout:.0f} s")

    def stop(self, grace: float = 15.0) -> None:
        if self.alive():
            self._signal(signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self._signal(signal.SIGKILL)      # whatever it forked and left behind
        if self.alive():
            self.proc.wait()
        self._out.close()

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry.name}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def tree(pid: int) -> list[int]:
    """pid and all its descendants."""
    kids = _children()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, ()))
    return out


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds so far, summed over processes (/proc/PID/stat fields
    14 and 15, in clock ticks); a process gone meanwhile counts 0."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])     # utime, stime (14, 15 overall)
    return total / ticks


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_kib(pids: list[int], key: str = "VmRSS") -> int:
    """VmRSS (now) or VmHWM (peak) summed over processes, in KiB."""
    return sum(_status_kib(p, key) for p in pids)


class MemorySampler:
    """Samples a process tree's VmRSS in a thread; `peak_rss` is the largest sum seen.

    `stop()` also reads VmHWM (each process's own peak) summed over the tree. When the
    tree's RSS passes `limit_kib`, `over_limit` is set so a transfer can give up.
    """

    def __init__(self, pid: int, interval: float = 0.2, limit_kib: int = 0):
        self.pid = pid
        self.interval = interval
        self.limit_kib = limit_kib
        self.peak_rss = 0
        self.hwm = 0
        self.hwm_one = 0
        self.over_limit = False
        self._pids = tree(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            if n % 10 == 0:
                self._pids = tree(self.pid)         # forks after start (proxy.py)
            n += 1
            rss = memory_kib(self._pids)
            self.peak_rss = max(self.peak_rss, rss)
            if self.limit_kib and rss > self.limit_kib:
                self.over_limit = True
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        pids = tree(self.pid)
        self.peak_rss = max(self.peak_rss, memory_kib(pids))
        self.hwm = memory_kib(pids, "VmHWM")
        # the largest one process's own peak: with a master, the worker that streamed
        self.hwm_one = max((_status_kib(p, "VmHWM") for p in pids), default=0)

"""Real Apache httpd for differential tests: a fixture run by Debian's apache2 and by
twistproxy from `twistproxy import-apache`, in front of the same recording backends.

A fixture names fixed ports (its Listen lines, its backends); `Fixture.text(ports)`
rewrites them to the ports a test reserved, so the same file runs twice side by side:
Apache on one set of front ports, twistproxy on another, both to the same backends.
Apache runs in the foreground (`-DFOREGROUND`) with its modules from
/usr/lib/apache2/modules, its pid file and logs in the test's folder.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

from harness import ROOT, free_port, wait_port

FIXTURES = ROOT / "tests" / "fixtures" / "apache"
APACHE = shutil.which("apache2") or "/usr/sbin/apache2"


def have_apache() -> bool:
    return Path(APACHE).exists()


class Fixture:
    """One Apache configuration, copied into `folder` with its ports rewritten."""

    def __init__(self, name: str, folder: Path):
        self.name = name
        self.folder = folder
        shutil.copytree(FIXTURES, folder, dirs_exist_ok=True)
        self.path = folder / name

    def rewrite(self, ports: dict[int, int], out: Path) -> Path:
        """Every file of the copy with `:PORT` -> `:ports[PORT]` and the /tmp pid and
        log files moved into the copy, written under `out` (the same layout)."""
        for src in self.folder.rglob("*"):
            if src.is_dir() or src.is_relative_to(out):
                continue
            dst = out / src.relative_to(self.folder)
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.suffix in (".conf", ".load"):
                text = src.read_text()
                text = re.sub(r":(\d{2,5})\b", lambda m: ":" + str(ports.get(int(m.group(1)),
                                                                         m.group(1))), text)
                text = re.sub(r"(?m)^(\s*Define\s+\w+\s+)(\d{2,5})\s*$",
                              lambda m: m.group(1) + str(ports.get(int(m.group(2)),
                                                                   m.group(2))), text)
                text = re.sub(r"/tmp/(apache-fixture-[\w.-]+)", lambda m: str(out / m.group(1)),
                              text)
                dst.write_text(text)
            else:
                shutil.copy(src, dst)
        return out / self.name


def fixture_ports(text: str) -> list[int]:
    """The ports a fixture names (Listen lines, vhosts, backend URLs)."""
    return sorted({int(p) for p in re.findall(r":(\d{4,5})\b", text)})


class Apache:
    """apache2 -DFOREGROUND on a rewritten fixture; stop() ends it."""

    def __init__(self, conf: Path, server_root: Path, wait_for: list[tuple[str, int]]):
        self.log = conf.parent / "apache.stderr"
        self._out = open(self.log, "wb")
        self.proc = subprocess.Popen([APACHE, "-DFOREGROUND", "-d", str(server_root),
                                      "-f", str(conf)], stdout=self._out, stderr=self._out)
        try:
            for host, port in wait_for:
                wait_port(host, port, proc=self.proc)
        except RuntimeError:
            self.stop()
            raise RuntimeError(f"apache2 did not start: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        time.sleep(0)


def reserve(ports: list[int], host: str = "127.0.0.1") -> dict[int, int]:
    return {p: free_port(host) for p in ports}

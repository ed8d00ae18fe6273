"""A real relay and two real daemons on loopback for every test module:
instance ``py-1`` (``one``) and ``py-2`` (``two``), each with its daemon
running. The binaries come from ``AGENT_LINK_BIN_DIR`` or the repository's
``target/debug`` (built with cargo when missing). Every wait is bounded."""

import os
import select
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
WAIT = 20.0


def bin_dir() -> Path:
    d = os.environ.get("AGENT_LINK_BIN_DIR")
    if d:
        return Path(d)
    d = REPO / "target" / "debug"
    if not (d / "agent-link").exists() or not (d / "agent-link-relay").exists():
        subprocess.run(
            ["cargo", "build", "--locked", "--bins", "-p", "agent-link", "-p", "agent-link-relay"],
            cwd=REPO,
            check=True,
        )
    return d


def read_line_with(proc: subprocess.Popen, needle: str) -> str:
    """The first line of the process's stderr that contains ``needle``."""
    deadline = time.monotonic() + WAIT
    buf = b""
    while time.monotonic() < deadline:
        r, _, _ = select.select([proc.stderr], [], [], 0.2)
        if r:
            chunk = os.read(proc.stderr.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
            for line in buf.decode(errors="replace").splitlines():
                if needle in line:
                    return line
    raise RuntimeError(f"no line with {needle!r}: {buf!r}")


class Fleet:
    def __init__(self, root: Path, ids=("py-1", "py-2"), one: Path = None, two: Path = None):
        self.bins = bin_dir()
        self.root = root
        self.procs = []
        relay_dir = root / "relay"
        relay = self.spawn([self.bin("agent-link-relay"), "run", "--dir", str(relay_dir), "--listen", "127.0.0.1:0"])
        self.addr = read_line_with(relay, "listening on ").split("listening on ")[1].split()[0]
        self.relay_dir = relay_dir
        self.one = one or root / "one"
        self.two = two or root / "two"
        for d in (self.one, self.two):
            d.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        for d, iid in [(self.one, ids[0]), (self.two, ids[1])]:
            token = subprocess.run(
                [self.bin("agent-link-relay"), "invite", "--dir", str(relay_dir), "--addr", self.addr, "--instance-id", iid],
                check=True, capture_output=True, text=True, timeout=WAIT,
            ).stdout.strip()
            subprocess.run(
                [self.bin("agent-link"), "init", "--dir", str(d), "--instance-id", iid, "--join", "-"],
                input=token, check=True, capture_output=True, text=True, timeout=WAIT,
            )
        self.daemons = {}
        for d in (self.one, self.two):
            self.start_daemon(d)

    def bin(self, name: str) -> str:
        return str(self.bins / name)

    def spawn(self, args):
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(p)
        return p

    def start_daemon(self, d: Path):
        p = self.spawn([self.bin("agent-link"), "daemon", "--dir", str(d)])
        read_line_with(p, "listening on")
        self.daemons[d] = p
        return p

    def stop_daemon(self, d: Path):
        p = self.daemons.pop(d)
        p.terminate()
        p.wait(timeout=WAIT)

    def close(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.kill()
            try:
                p.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def fleet():
    with tempfile.TemporaryDirectory() as t:
        root = Path(t)
        os.chmod(root, 0o700)
        f = Fleet(root)
        try:
            yield f
        finally:
            f.close()

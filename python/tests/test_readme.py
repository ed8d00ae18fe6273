"""The README's Python and JavaScript examples, run as they stand (only HOME
points at a temporary directory), against the quickstart's layout: two real
daemons at ~/.local/share/agent-link-demo/{one,two} as instance-001 and
instance-002 on a real relay."""

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, Fleet

README = (REPO / "README.md").read_text()


def block(section: str, lang: str) -> str:
    start = README.index(section)
    m = re.compile(r"```" + lang + r"\n(.*?)```", re.S).search(README, start)
    assert m, f"no {lang} block after {section}"
    return m.group(1)


@pytest.fixture
def demo():
    with tempfile.TemporaryDirectory() as t:
        home = Path(t)
        os.chmod(home, 0o700)
        base = home / ".local" / "share" / "agent-link-demo"
        f = Fleet(home, ids=("instance-001", "instance-002"), one=base / "one", two=base / "two")
        try:
            yield home
        finally:
            f.close()


def test_the_python_example(demo):
    env = dict(os.environ, HOME=str(demo), PYTHONPATH=str(REPO / "python"))
    out = subprocess.run([sys.executable, "-c", block("### From Python", "python")],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "delivered " in out.stdout and "to instance-001/xiaobaozi" in out.stdout, out.stdout
    assert "收到来自 instance-002/xiaodingding 的消息: 你好，小包子!" in out.stdout, out.stdout


def test_the_javascript_example(demo):
    if shutil.which("node") is None:
        pytest.skip("node is not installed")
    # Inside the package, `import ... from "agent-link"` resolves to it
    # (a package may import itself by name through its "exports").
    script = REPO / "js" / f".readme-example-{os.getpid()}.mjs"
    script.write_text(block("### From JavaScript", "js"))
    try:
        out = subprocess.run(["node", str(script)], env=dict(os.environ, HOME=str(demo)),
                             capture_output=True, text=True, timeout=60)
    finally:
        script.unlink()
    assert out.returncode == 0, out.stderr
    assert "delivered " in out.stdout and "to instance-001/xiaobaozi" in out.stdout, out.stdout
    assert "instance-002/xiaodingding: hi" in out.stdout, out.stdout

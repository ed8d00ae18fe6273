"""skill/SKILL.md followed as written: its commands (default directory,
the placeholder MYNAME filled in) against a real relay and two daemons —
this computer's instance in the default directory, and instance-002 with
an agent xiaobaozi."""

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import REPO, WAIT, Fleet

SKILL = (REPO / "skill" / "SKILL.md").read_text()


@pytest.fixture
def home():
    with tempfile.TemporaryDirectory() as t:
        home = Path(t)
        os.chmod(home, 0o700)
        f = Fleet(home, ids=("instance-001", "instance-002"),
                  one=home / ".local" / "share" / "agent-link", two=home / "other")
        try:
            yield home, f
        finally:
            f.close()


def commands():
    """Every command line of the skill's sh blocks, in order."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", SKILL, re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith("agent-link "):
                out.append(line)
    return out


def test_the_front_matter_names_the_binary_and_no_secret():
    front = SKILL.split("---")[1]
    assert re.search(r"^name: agent-link$", front, re.M)
    assert re.search(r"^description: .+", front, re.M)
    assert "- agent-link" in front
    assert "--join " not in SKILL and "--join-file FILE" in SKILL, "the token is read from a file"


def test_the_skill_commands_work_as_written(home):
    home, fleet = home
    env = dict(os.environ, HOME=str(home), PATH=f"{fleet.bins}:{os.environ['PATH']}")
    env.pop("XDG_DATA_HOME", None)

    def run(line, check=True):
        line = line.replace("MYNAME", "helper")
        out = subprocess.run(line, shell=True, env=env, capture_output=True, text=True, timeout=WAIT * 4)
        if check:
            assert out.returncode == 0, f"{line}: {out.stderr}"
        return out

    other = ["agent-link", "agent", "add", "--dir", str(fleet.two), "xiaobaozi"]
    subprocess.run(other, env=env, check=True, capture_output=True, timeout=WAIT)
    cmds = commands()
    status = run(next(c for c in cmds if c == "agent-link status"))
    assert "(daemon running)" in status.stdout
    run(next(c for c in cmds if c.startswith("agent-link agent add")))
    sent = run(next(c for c in cmds if c.startswith("agent-link send")))
    assert sent.stdout.startswith("delivered ") and "instance-002/xiaobaozi" in sent.stdout
    # Someone answers; the skill's way of waiting for it gets it.
    subprocess.run(["agent-link", "send", "--dir", str(fleet.two), "--from", "xiaobaozi",
                    "--to", "instance-001/helper", "thanks"], env=env, check=True, capture_output=True, timeout=WAIT)
    listed = run(next(c for c in cmds if c.startswith("agent-link inbox")))
    (m,) = [json.loads(l) for l in listed.stdout.splitlines()]
    assert m["from"] == "instance-002/xiaobaozi" and m["message"] == "thanks"
    got = run(next(c for c in cmds if c.startswith("agent-link recv") and "--wait" in c))
    assert json.loads(got.stdout)["id"] == m["id"]
    # Nothing more: the wait ends with exit 5, as the table says.
    nothing = run("agent-link recv --agent MYNAME --wait 1 --json", check=False)
    assert nothing.returncode == 5 and nothing.stdout == ""

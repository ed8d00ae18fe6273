"""The Python client against two real daemons and a real relay."""

import asyncio
import os
import threading

import pytest

from agent_link import AgentLink, Message, Receipt, error_class
import agent_link


def test_send_and_receive_with_the_original_api(fleet):
    bob = AgentLink(agent_id="xiaobaozi", dir=str(fleet.two))
    bob.register()  # not running: messages wait in its inbox
    alice = AgentLink(agent_id="xiaodingding", config_path=str(fleet.one / "agent-link-config.json"))
    receipt = alice.send("py-2/xiaobaozi", "你好，小包子!")
    assert isinstance(receipt, Receipt)
    assert receipt.to == "py-2/xiaobaozi" and len(receipt.id) == 32 and receipt.delivered_at > 0
    # A bare name, bytes that are not UTF-8.
    r2 = alice.send("xiaobaozi", b"\xff\x00raw")
    assert r2.to == "py-2/xiaobaozi"
    waiting = bob.inbox()
    assert [m.id for m in waiting] == [receipt.id, r2.id]
    got = []

    @bob.on_message
    def handle(from_agent, message):
        got.append((from_agent, message))
        if len(got) == 3:
            bob.stop()

    @bob.on_message
    def rich(msg):
        assert isinstance(msg, Message)
        got_rich.append(msg.data)

    got_rich = []
    t = threading.Thread(target=bob.run_forever)
    t.start()
    alice.send("py-2/xiaobaozi", "live")
    t.join(timeout=20)
    assert not t.is_alive()
    assert got[0] == ("py-1/xiaodingding", "你好，小包子!")
    assert got[2] == ("py-1/xiaodingding", "live")
    assert got_rich[1] == b"\xff\x00raw"
    assert bob.inbox() == [], "handled means acked"


def test_recv_wait_and_ack_and_status(fleet):
    bob = AgentLink(agent_id="bob", dir=str(fleet.two))
    bob.register()
    assert bob.recv() is None
    assert bob.recv(wait=1) is None
    alice = AgentLink(agent_id="alice", dir=str(fleet.one))
    r = alice.send("py-2/bob", "one")
    m = bob.recv(wait=5)
    assert m is not None and m.id == r.id and m.message == "one" and m.from_agent == "py-1/alice"
    alice.send("py-2/bob", "two")
    (w,) = bob.inbox()
    bob.ack(w.id)
    with pytest.raises(agent_link.UnknownMessage) as e:
        bob.ack(w.id)
    assert e.value.code == "UnknownMessage" and e.value.exit_code == 2
    st = bob.status()
    assert st["daemon"] is True and st["instance_id"] == "py-2"
    assert [a["agent"] for a in st["local_agents"]] == ["bob"]


def test_wait_read_returns_once_the_target_read_it(fleet):
    bob = AgentLink(agent_id="bob", dir=str(fleet.two))
    bob.register()
    alice = AgentLink(agent_id="alice", dir=str(fleet.one))
    out = {}
    t = threading.Thread(target=lambda: out.update(r=alice.send("py-2/bob", "read me", wait_read=20)))
    t.start()
    m = bob.recv(wait=10)
    assert m is not None
    t.join(timeout=30)
    assert out["r"].read_at is not None and out["r"].read_at >= out["r"].delivered_at
    with pytest.raises(agent_link.ReadTimeout) as e:
        alice.send("py-2/bob", "unread", wait_read=1)
    assert e.value.exit_code == 5 and "delivered" in str(e.value)


def test_errors_are_named_and_say_what_to_do(fleet):
    alice = AgentLink(agent_id="alice", dir=str(fleet.one))
    with pytest.raises(agent_link.TargetOffline) as e:
        alice.send("py-2/nobody", "x")
    assert e.value.exit_code == 3
    with pytest.raises(agent_link.UnknownTarget):
        alice.send("nobody", "x")
    with pytest.raises(agent_link.BadAddress):
        alice.send("a/b/c", "x")
    with pytest.raises(agent_link.TooLarge):
        alice.send("py-2/nobody", "x" * (2 * 1024 * 1024))
    with pytest.raises(agent_link.UnknownAgent):
        AgentLink(agent_id="ghost", dir=str(fleet.two)).inbox()
    assert issubclass(error_class("InboxFull"), agent_link.AgentLinkError)
    # No daemon: a clear error naming the command to run.
    fleet.stop_daemon(fleet.one)
    with pytest.raises(agent_link.DaemonNotRunning) as e:
        alice.send("py-2/bob", "x")
    assert "agent-link daemon --dir" in str(e.value)
    with pytest.raises(agent_link.DaemonNotRunning):
        AgentLink(agent_id="x", dir=str(fleet.root / "nowhere")).status()


def test_a_handler_that_raises_leaves_the_message_and_stops(fleet):
    bob = AgentLink(agent_id="bob", dir=str(fleet.two))
    bob.register()
    AgentLink(agent_id="alice", dir=str(fleet.one)).send("py-2/bob", "boom")

    @bob.on_message
    def handle(msg):
        raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError):
        bob.run_forever()
    assert [m.message for m in bob.inbox()] == ["boom"], "not acked"


def test_the_asyncio_variant(fleet):
    from agent_link.aio import AgentLink as AsyncLink

    async def main():
        bob = AsyncLink(agent_id="bob", dir=str(fleet.two))
        await bob.register()
        alice = AsyncLink(agent_id="alice", dir=str(fleet.one))
        got = []

        @bob.on_message
        async def handle(from_agent, message):
            got.append(message)
            if len(got) == 2:
                bob.stop()

        runner = asyncio.create_task(bob.run_forever())
        r = await alice.send("py-2/bob", "a1")
        await alice.send("py-2/bob", "a2")
        await asyncio.wait_for(runner, 20)
        assert got == ["a1", "a2"] and len(r.id) == 32
        assert await bob.inbox() == []

    asyncio.run(main())


def test_a_client_of_another_user_is_refused(fleet):
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user")
    os.chmod(fleet.one, 0o711)
    os.chmod(fleet.one / "agent-link.sock", 0o666)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setuid(65534)
            try:
                AgentLink(agent_id="x", dir=str(fleet.one)).status()
            except agent_link.PermissionDenied:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "PermissionDenied for uid 65534"


def test_a_daemon_that_stops_ends_run_forever_with_a_clear_error(fleet):
    bob = AgentLink(agent_id="bob", dir=str(fleet.two))
    errors = []

    @bob.on_message
    def handle(msg):
        pass

    def run():
        try:
            bob.run_forever()
        except agent_link.AgentLinkError as e:
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    # Registered (its inbox exists) before the daemon goes.
    for _ in range(200):
        if any(a["agent"] == "bob" for a in bob.status()["local_agents"]):
            break
        threading.Event().wait(0.05)
    fleet.stop_daemon(fleet.two)
    t.join(timeout=20)
    assert not t.is_alive()
    assert errors and errors[0].code == "Unavailable" and "stopped" in str(errors[0])

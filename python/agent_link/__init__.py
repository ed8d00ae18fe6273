"""agent-link for Python: the API of the tool agent-link replaces, on the
local daemon (``agent-link daemon``).

The client is thin: no QUIC, no keys. It talks HTTP/1.1 + JSON to the
daemon's unix socket ``DIR/agent-link.sock`` (LOCAL-API.md), which does the
cryptography, holds the one relay connection and the durable inboxes.

    from agent_link import AgentLink
    link = AgentLink(agent_id="xiaodingding")
    receipt = link.send("instance-002/xiaobaozi", "你好，小包子!")

    @link.on_message
    def handle(from_agent, message):
        print(f"收到来自 {from_agent} 的消息: {message}")

    link.run_forever()

Standard library only; Python 3.9 or newer.
"""

from __future__ import annotations

import base64
import http.client
import inspect
import json
import os
import queue
import socket
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Union

__all__ = [
    "AgentLink",
    "Message",
    "Receipt",
    "AgentLinkError",
    "DaemonNotRunning",
    "PermissionDenied",
    "error_class",
]

SOCKET_FILE = "agent-link.sock"
CONFIG_FILE = "agent-link-config.json"


def default_dir() -> str:
    """The peer directory the CLI uses when ``--dir`` is left out."""
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg:
        return os.path.join(xdg, "agent-link")
    return os.path.join(os.path.expanduser("~"), ".local", "share", "agent-link")


class AgentLinkError(Exception):
    """A refusal or failure, named like the CLI's errors.

    ``code`` is the error's name (``"TargetOffline"``, ``"InboxFull"``, ...),
    ``exit_code`` the exit code the CLI ends with for it, ``str(e)`` one line
    that says what to do next.
    """

    code = "Error"
    exit_code = 1

    def __init__(self, message: str, code: Optional[str] = None, exit_code: Optional[int] = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if exit_code is not None:
            self.exit_code = exit_code


_CLASSES: Dict[str, type] = {}


def _define(name: str, exit_code: int, doc: str) -> type:
    cls = type(name, (AgentLinkError,), {"code": name, "exit_code": exit_code, "__doc__": doc})
    _CLASSES[name] = cls
    globals()[name] = cls
    __all__.append(name)
    return cls


for _name, _exit, _doc in [
    ("BadRequest", 2, "The request was malformed (an argument, a name, a message id)."),
    ("BadAddress", 2, "The target is not INSTANCE/AGENT or a valid agent name."),
    ("UnknownAgent", 2, "The agent is not registered at this instance."),
    ("UnknownMessage", 2, "No such message is waiting (already acked, expired, or never came)."),
    ("AmbiguousTarget", 2, "A bare agent name is attached on several instances."),
    ("TooLarge", 2, "The message is over the relay's size limit."),
    ("TargetOffline", 3, "The target agent is not attached."),
    ("UnknownTarget", 3, "The target instance (or bare agent) is not known or not online."),
    ("TargetRevoked", 3, "The target instance has been revoked."),
    ("InboxFull", 1, "The target agent's inbox is full; try later."),
    ("Busy", 1, "The target is not keeping up; try later."),
    ("RateLimited", 1, "This instance sends too fast; slow down."),
    ("Timeout", 5, "No receipt before the deadline; the outcome is unknown."),
    ("ReadTimeout", 5, "Delivered, but not read in time."),
    ("Unavailable", 1, "The daemon is not connected to the relay, or went away."),
    ("Closed", 1, "The daemon is stopping."),
    ("Internal", 1, "The daemon could not read or write a file."),
    ("KeyChanged", 4, "The receiver has another key pinned for this instance."),
    ("Revoked", 4, "This instance has been revoked."),
    ("NotRegistered", 4, "This instance is not registered with the relay."),
    ("BadTag", 4, "The fleet tag did not verify (wrong fleet secret)."),
    ("BadSignature", 4, "The signature did not verify."),
]:
    _define(_name, _exit, _doc)


class DaemonNotRunning(AgentLinkError):
    """No daemon serves the peer directory's socket."""

    code = "DaemonNotRunning"
    exit_code = 1


class PermissionDenied(AgentLinkError):
    """The daemon's socket belongs to another user."""

    code = "PermissionDenied"
    exit_code = 1


def error_class(code: str) -> type:
    """The exception class for an error name (``AgentLinkError`` if unknown)."""
    return _CLASSES.get(code, AgentLinkError)


@dataclass(frozen=True)
class Receipt:
    """Proof of delivery: through a daemon, the message is durably in the
    target agent's inbox; through ``listen``, its application took it."""

    id: str
    to: str
    delivered_at: int
    read_at: Optional[int] = None


@dataclass(frozen=True)
class Message:
    """A message for one of this instance's agents."""

    id: str
    from_agent: str
    to: str
    sent_at: int
    received_at: int
    data: bytes

    @property
    def message(self) -> str:
        """The payload as text (invalid UTF-8 replaced)."""
        return self.data.decode("utf-8", errors="replace")

    @classmethod
    def _from_json(cls, v: Dict[str, Any]) -> "Message":
        if "message" in v:
            data = v["message"].encode("utf-8")
        else:
            data = base64.b64decode(v.get("message_base64", ""))
        return cls(
            id=v["id"],
            from_agent=v["from"],
            to=v["to"],
            sent_at=int(v.get("sent_at", 0)),
            received_at=int(v.get("received_at", 0)),
            data=data,
        )


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: Optional[float]):
        super().__init__("agent-link", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        if self.timeout is not None:
            s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


Handler = Callable[..., Any]


class AgentLink:
    """One agent of this computer's instance, through its daemon.

    ``dir`` is the peer directory (made by ``agent-link init``), or
    ``config_path`` its ``agent-link-config.json``; neither: the default
    directory (``$XDG_DATA_HOME/agent-link`` or ``~/.local/share/agent-link``).
    """

    def __init__(self, agent_id: str, config_path: Optional[str] = None, dir: Optional[str] = None):
        if dir is None and config_path is not None:
            dir = os.path.dirname(os.path.abspath(config_path))
        self.agent_id = agent_id
        self.dir = dir or default_dir()
        self.socket_path = os.path.join(self.dir, SOCKET_FILE)
        self._handlers: List[Handler] = []
        self._stop = threading.Event()
        self._stream: Optional[_UnixConnection] = None
        # Idle keep-alive connections, reused by any thread.
        self._idle: List[_UnixConnection] = []
        self._idle_lock = threading.Lock()

    # -- plumbing ---------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        body: Optional[dict] = None,
        timeout: Optional[float] = 120.0,
        reuse: bool = True,
    ) -> Any:
        # `reuse=False` for requests that must not be retried (a send): a kept
        # connection that fails cannot tell "closed before the request" from
        # "closed after the daemon acted on it", so only idempotent requests
        # ride on kept connections (and are retried once on a fresh one).
        payload = json.dumps(body).encode() if body is not None else b""
        headers = {"Content-Type": "application/json"}
        conn = None
        if reuse:
            with self._idle_lock:
                conn = self._idle.pop() if self._idle else None
        fresh = conn is None
        if conn is None:
            conn = self._connect(timeout)
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        try:
            try:
                conn.request(method, path, body=payload, headers=headers)
                res = conn.getresponse()
                raw = res.read()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected, http.client.CannotSendRequest):
                conn.close()
                if not fresh:
                    # A kept connection the daemon closed meanwhile: once more
                    # on a new one (idempotent requests only, see above).
                    return self._request(method, path, body, timeout, reuse=False)
                raise self._closed_error() from None
        except BaseException:
            conn.close()
            raise
        if res.will_close:
            conn.close()
        else:
            with self._idle_lock:
                if len(self._idle) < 8:
                    self._idle.append(conn)
                else:
                    conn.close()
        return self._decode(res.status, raw)

    def _closed_error(self) -> AgentLinkError:
        """The daemon closed a fresh connection without an answer: it
        refuses this user (its socket is another's), or it stopped."""
        try:
            owner = os.stat(self.socket_path).st_uid
        except OSError:
            owner = os.geteuid()
        if owner != os.geteuid() and os.geteuid() != 0:
            return PermissionDenied(
                f"the daemon at {self.socket_path} belongs to uid {owner} and refuses clients of "
                "another user; run this as the daemon's user"
            )
        return Unavailable(  # type: ignore[name-defined]  # noqa: F821
            f"the daemon at {self.socket_path} closed the connection without an answer (did it stop?); "
            "the outcome of this request is unknown"
        )

    def _connect(self, timeout: Optional[float]) -> _UnixConnection:
        conn = _UnixConnection(self.socket_path, timeout)
        try:
            conn.connect()
        except FileNotFoundError:
            raise DaemonNotRunning(
                f"no daemon for {self.dir}: start it with `agent-link daemon --dir {self.dir}`"
            ) from None
        except ConnectionRefusedError:
            raise DaemonNotRunning(
                f"the daemon for {self.dir} is not running (a stale socket is left): "
                f"start it with `agent-link daemon --dir {self.dir}`"
            ) from None
        except PermissionError:
            raise PermissionDenied(
                f"{self.socket_path} belongs to another user: run as the daemon's user"
            ) from None
        return conn

    @staticmethod
    def _decode(status: int, raw: bytes) -> Any:
        try:
            v = json.loads(raw.decode("utf-8")) if raw else {}
        except ValueError:
            raise AgentLinkError(f"the daemon answered HTTP {status} with something that is not JSON") from None
        if 200 <= status < 300:
            return v
        code = v.get("error", "Error")
        cls = error_class(code)
        raise cls(v.get("message", f"HTTP {status}"), code=code, exit_code=v.get("exit_code"))

    def _agent_path(self, suffix: str = "") -> str:
        return "/v1/agents/" + urllib.parse.quote(self.agent_id, safe="") + suffix

    # -- sending ----------------------------------------------------------

    def send(
        self,
        to: str,
        message: Union[str, bytes],
        timeout: Optional[float] = None,
        wait_read: Optional[float] = None,
    ) -> Receipt:
        """Send ``message`` to ``to`` (``INSTANCE/AGENT``, or a bare agent name:
        the one online instance where it is attached). Blocks until the
        receipt; raises an ``AgentLinkError`` subclass naming the cause. With
        ``wait_read`` (seconds), also waits until the target agent read it."""
        body: Dict[str, Any] = {"from": self.agent_id, "to": to}
        if isinstance(message, bytes):
            try:
                body["message"] = message.decode("utf-8")
            except UnicodeDecodeError:
                body["message_base64"] = base64.b64encode(message).decode("ascii")
        else:
            body["message"] = message
        if timeout is not None:
            body["timeout_secs"] = max(1, int(round(timeout)))
        if wait_read is not None:
            body["wait_read_secs"] = max(1, int(round(wait_read)))
        wait = (timeout or 3600) + (wait_read or 0) + 10
        v = self._request("POST", "/v1/send", body, timeout=wait, reuse=False)
        return Receipt(id=v["id"], to=v["to"], delivered_at=int(v["delivered_at"]), read_at=v.get("read_at"))

    # -- receiving --------------------------------------------------------

    def register(self) -> None:
        """Register this agent at the daemon (idempotent): from then on its
        messages are kept in its inbox even while no process of it runs."""
        self._request("POST", "/v1/agents", {"agent": self.agent_id})

    def inbox(self, limit: int = 100) -> List[Message]:
        """The messages waiting, oldest first, without removing them."""
        v = self._request("GET", self._agent_path(f"/inbox?limit={int(limit)}"))
        return [Message._from_json(m) for m in v["messages"]]

    def recv(self, wait: Optional[float] = None) -> Optional[Message]:
        """The oldest waiting message, removed once returned; with ``wait``
        (seconds), wait for one; ``None`` when none came."""
        q = "/inbox?limit=1"
        if wait is not None:
            q += f"&wait={max(0, int(round(wait)))}"
        v = self._request("GET", self._agent_path(q), timeout=(wait or 0) + 60)
        if not v["messages"]:
            return None
        m = Message._from_json(v["messages"][0])
        try:
            self.ack(m.id)
        except UnknownMessage:  # type: ignore[name-defined]  # noqa: F821
            pass  # another reader took it first
        return m

    def ack(self, id: str) -> None:
        """Remove message ``id`` (after reading it with ``inbox``); sends the
        read receipt its sender may have asked for."""
        self._request("DELETE", self._agent_path("/inbox/" + urllib.parse.quote(id, safe="")))

    def status(self) -> Dict[str, Any]:
        """The daemon's status: instance, relay connection, agents and inbox depths."""
        return self._request("GET", "/v1/status")

    def on_message(self, handler: Handler) -> Handler:
        """Decorator: call ``handler(from_agent, message)`` — or ``handler(msg)``
        with a ``Message`` — for every message, from ``run_forever``. A message
        is acked (removed) once its handler returned; a handler that raises
        leaves it in the inbox and stops ``run_forever`` with the error."""
        self._handlers.append(handler)
        return handler

    def _events(self) -> Iterator[Message]:
        conn = self._connect(None)
        self._stream = conn
        try:
            conn.request("GET", self._agent_path("/events"))
            res = conn.getresponse()
            if res.status != 200:
                self._decode(res.status, res.read())
            while not self._stop.is_set():
                line = res.readline()
                if not line:
                    if self._stop.is_set():
                        return
                    raise Unavailable("the daemon closed the event stream (it stopped?)")  # type: ignore[name-defined]  # noqa: F821
                line = line.strip()
                if line:
                    yield Message._from_json(json.loads(line))
        except OSError:
            if self._stop.is_set():
                return
            raise
        finally:
            self._stream = None
            conn.close()

    def run_forever(self) -> None:
        """Register the agent, then hand every waiting and arriving message to
        the ``on_message`` handlers until ``stop()``. Each message is acked
        once its handlers returned (acks go out in batches, off the handler's
        thread; ``run_forever`` returns only after the last one)."""
        if not self._handlers:
            raise BadRequest("no handler: decorate one with @link.on_message first")  # type: ignore[name-defined]  # noqa: F821
        self._stop.clear()
        self.register()
        acks: "queue.Queue[Optional[str]]" = queue.Queue()
        failed: List[BaseException] = []
        acker = threading.Thread(target=self._ack_loop, args=(acks, failed), daemon=True)
        acker.start()
        try:
            for m in self._events():
                if failed:
                    raise failed[0]
                for h in self._handlers:
                    _call(h, m)
                acks.put(m.id)
        finally:
            acks.put(None)
            acker.join(timeout=60)
        if failed:
            raise failed[0]

    def _ack_loop(self, acks: "queue.Queue[Optional[str]]", failed: List[BaseException]) -> None:
        done = False
        while not done:
            batch = [acks.get()]
            while len(batch) < 1000:
                try:
                    batch.append(acks.get_nowait())
                except queue.Empty:
                    break
            if None in batch:
                done = True
                batch = [i for i in batch if i is not None]
            if batch:
                try:
                    self._request("POST", self._agent_path("/ack"), {"ids": batch})
                except BaseException as e:  # reported by run_forever
                    failed.append(e)
                    return

    def stop(self) -> None:
        """End ``run_forever`` (from a handler or another thread)."""
        self._stop.set()
        s = self._stream
        if s is not None and s.sock is not None:
            try:
                s.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _call(handler: Handler, m: Message) -> Any:
    try:
        params = [
            p
            for p in inspect.signature(handler).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    if len(params) >= 2:
        return handler(m.from_agent, m.message)
    return handler(m)

"""The asyncio variant of :class:`agent_link.AgentLink`: the same calls as
coroutines (each runs the blocking client on a worker thread, so the event
loop never waits on the socket), and ``on_message`` handlers that may be
coroutines.

    from agent_link.aio import AgentLink
    link = AgentLink(agent_id="xiaodingding")
    receipt = await link.send("instance-002/xiaobaozi", "hi")
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Dict, List, Optional, Union

from . import AgentLink as _SyncLink
from . import Message, Receipt, UnknownMessage, _call  # type: ignore[attr-defined]

__all__ = ["AgentLink"]


class AgentLink:
    """Like :class:`agent_link.AgentLink`, with coroutines."""

    def __init__(self, agent_id: str, config_path: Optional[str] = None, dir: Optional[str] = None):
        self._sync = _SyncLink(agent_id, config_path=config_path, dir=dir)
        self.agent_id = agent_id
        self.dir = self._sync.dir
        self._handlers: List[Any] = []

    async def send(
        self,
        to: str,
        message: Union[str, bytes],
        timeout: Optional[float] = None,
        wait_read: Optional[float] = None,
    ) -> Receipt:
        return await asyncio.to_thread(self._sync.send, to, message, timeout, wait_read)

    async def register(self) -> None:
        await asyncio.to_thread(self._sync.register)

    async def inbox(self, limit: int = 100) -> List[Message]:
        return await asyncio.to_thread(self._sync.inbox, limit)

    async def recv(self, wait: Optional[float] = None) -> Optional[Message]:
        return await asyncio.to_thread(self._sync.recv, wait)

    async def ack(self, id: str) -> None:
        await asyncio.to_thread(self._sync.ack, id)

    async def status(self) -> Dict[str, Any]:
        return await asyncio.to_thread(self._sync.status)

    def on_message(self, handler: Any) -> Any:
        """Decorator, as in the blocking client; the handler may be async."""
        self._handlers.append(handler)
        return handler

    async def run_forever(self) -> None:
        """Deliver every waiting and arriving message to the handlers until
        ``stop()``; each is acked once its handlers returned."""
        await self.register()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue(maxsize=64)
        done = object()

        def pump() -> None:
            try:
                for m in self._sync._events():
                    asyncio.run_coroutine_threadsafe(queue.put(m), loop).result()
                asyncio.run_coroutine_threadsafe(queue.put(done), loop).result()
            except BaseException as e:  # handed to the loop
                asyncio.run_coroutine_threadsafe(queue.put(e), loop).result()

        reader = loop.run_in_executor(None, pump)
        try:
            while True:
                m = await queue.get()
                if m is done:
                    return
                if isinstance(m, BaseException):
                    raise m
                for h in self._handlers:
                    r = _call(h, m)
                    if inspect.isawaitable(r):
                        await r
                try:
                    await self.ack(m.id)
                except UnknownMessage:
                    pass
        finally:
            self._sync.stop()
            await asyncio.wait_for(asyncio.shield(reader), timeout=5)

    def stop(self) -> None:
        self._sync.stop()

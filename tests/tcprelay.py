"""A TCP relay on loopback between a client under test and a real etcd, to cut or silence the
path between them while other clients still reach etcd directly: a host partitioned from etcd
(the same etcd that other hosts keep using), which one machine cannot build otherwise without
touching the host's firewall.

    async with TcpRelay("127.0.0.1", etcd_port) as relay:
        opts = EtcdOptions(endpoints=(relay.endpoint,), ...)
        relay.cut()       # every connection reset, new ones refused until restore()
        relay.freeze()    # connections stay open, nothing passes either way (a silent path)
        relay.restore()

Bytes are relayed unchanged; the relay runs in the test's event loop and ends with it. For a
test that blocks (waiting on a daemon subprocess), `relay_thread()` runs one in a thread of its
own and makes cut/freeze/restore thread-safe.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from types import TracebackType


class TcpRelay:
    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.port = 0
        self.state = "open"
        """open: relaying; cut: refusing; frozen: holding connections, passing nothing."""
        self.connections = 0
        """Connections accepted so far (a client that reconnected shows here)."""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()

    @property
    def endpoint(self) -> str:
        return f"http://{self.listen_host}:{self.port}"

    async def __aenter__(self) -> TcpRelay:
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._server is not None:
            self._server.close()
        self._drop_all()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def cut(self) -> None:
        self.state = "cut"
        self._flowing.set()
        self._drop_all()

    def freeze(self) -> None:
        self.state = "frozen"
        self._flowing.clear()

    def restore(self) -> None:
        self.state = "open"
        self._flowing.set()

    def _drop_all(self) -> None:
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
        self._writers.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.state == "cut":
            writer.transport.abort()
            return
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers |= {writer, up_writer}
        pumps = [
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ]
        self._tasks.update(pumps)
        try:
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pumps:
                task.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)
            self._tasks.difference_update(pumps)
            for w in (writer, up_writer):
                self._writers.discard(w)
                w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                await self._flowing.wait()  # frozen: hold what arrived, pass nothing
                if self.state == "cut":
                    return
                writer.write(data)
                await writer.drain()


class ThreadedRelay:
    """A TcpRelay in its own thread and event loop; every method is safe to call from another
    thread (and returns once the relay applied it)."""

    def __init__(self, relay: TcpRelay, loop: asyncio.AbstractEventLoop) -> None:
        self.relay = relay
        self._loop = loop

    @property
    def endpoint(self) -> str:
        return self.relay.endpoint

    def _call(self, method: str) -> None:
        async def apply() -> None:
            getattr(self.relay, method)()

        asyncio.run_coroutine_threadsafe(apply(), self._loop).result(10)

    def cut(self) -> None:
        self._call("cut")

    def freeze(self) -> None:
        self._call("freeze")

    def restore(self) -> None:
        self._call("restore")


@contextlib.contextmanager
def relay_thread(
    target_host: str, target_port: int, listen_host: str = "127.0.0.1"
) -> Iterator[ThreadedRelay]:
    """A TcpRelay running in a thread for the duration of the `with` block."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop: asyncio.Future[None] | None = None
    relay = TcpRelay(target_host, target_port, listen_host)
    failure: list[BaseException] = []

    async def main() -> None:
        nonlocal stop
        stop = loop.create_future()
        try:
            async with relay:
                started.set()
                await stop
        except BaseException as e:
            failure.append(e)
            started.set()

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),), daemon=True)
    thread.start()
    try:
        if not started.wait(10) or failure:
            raise RuntimeError(f"the relay did not start: {failure}")
        yield ThreadedRelay(relay, loop)
    finally:
        if stop is not None:
            loop.call_soon_threadsafe(lambda: stop.done() or stop.set_result(None))
        thread.join(10)
        if not thread.is_alive():
            loop.close()

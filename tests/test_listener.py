"""The listener's accept loop: connections handed over, one connection's errors skipped, running out
of descriptors survived, the listening socket closed when accepting stops."""

from __future__ import annotations

import errno
import socket

import pytest
import trio

from atlas.proxy.listener import _accept_clients


async def test_accept_loop_hands_over_connections_and_survives_accept_errors(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    real_accept = socket.socket.accept
    failures = [errno.ECONNABORTED, errno.EMFILE]

    def accept(self: socket.socket) -> tuple[socket.socket, object]:
        if failures and self.getsockname()[1] == port:
            raise OSError(failures.pop(0), "injected")
        return real_accept(self)

    monkeypatch.setattr(socket.socket, "accept", accept)
    got: list[trio.SocketStream] = []
    arrived = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        got.append(stream)
        if len(got) == 3:
            arrived.set()

    clients = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_accept_clients, listener, nursery, handler)
        for _ in range(3):
            clients.append(await trio.open_tcp_stream("127.0.0.1", port))
        with trio.fail_after(5):
            await arrived.wait()
        nursery.cancel_scope.cancel()  # stops accepting
    assert failures == []
    assert len(got) == 3
    assert any("accept failed: EMFILE" in record.getMessage() for record in caplog.records)
    # Each stream is a working connection to one of the clients.
    for stream in got:
        await stream.send_all(b"x")
    for client in clients:
        assert await client.receive_some() == b"x"
    # Accepting stopped: the listening socket is closed.
    with pytest.raises(OSError):
        await trio.open_tcp_stream("127.0.0.1", port)
    for stream in (*got, *clients):
        await stream.aclose()

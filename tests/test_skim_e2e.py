"""Skimming end to end: the relay's tap, analyzers loaded from the config, the live tap over SSE."""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import trio

from atlas.config import AdminConfig, AnalyzerConfig, Config, ProxyConfig, ServerConfig, SkimConfig
from atlas.demo.servers import serve_echo_server
from atlas.skim import SkimEvent, SkimFrame
from atlas.supervisor import AtlasStarted, serve_atlas
from tests.wsclient import open_ws, until

RECORDED: list[SkimFrame] = []


class StuckAnalyzer:
    """Never reads its channel: it fills up, and the relay must not notice."""

    name = "stuck"

    async def run(
        self, frames: trio.MemoryReceiveChannel[SkimFrame], emit: Callable[[SkimEvent], None]
    ) -> None:
        await trio.sleep_forever()


class RecordingAnalyzer:
    """Keeps every frame it is given."""

    name = "recording"

    async def run(
        self, frames: trio.MemoryReceiveChannel[SkimFrame], emit: Callable[[SkimEvent], None]
    ) -> None:
        async for frame in frames:
            RECORDED.append(frame)


def _config(port: int) -> Config:
    return Config(
        proxy=ProxyConfig(listen="127.0.0.1:0"),
        admin=AdminConfig(listen="127.0.0.1:0"),
        servers=(ServerConfig(name="echo", url=f"ws://127.0.0.1:{port}"),),
        skim=SkimConfig(directions=("up", "down"), buffer=16, analyzer_buffer=8),
        analyzers=(
            AnalyzerConfig(path="tests.test_skim_e2e:StuckAnalyzer"),
            AnalyzerConfig(path="tests.test_skim_e2e:RecordingAnalyzer"),
        ),
    )


async def test_a_stuck_analyzer_never_slows_or_stops_the_relay() -> None:
    RECORDED.clear()
    messages = 2000
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_echo_server, "127.0.0.1", 0)
        atlas: AtlasStarted = await nursery.start(serve_atlas, _config(port))
        async with open_ws(f"ws://127.0.0.1:{atlas.proxy.port}/") as ws:
            with trio.fail_after(30):
                for i in range(messages):
                    await ws.send_message(json.dumps({"type": "move", "x": i, "y": 0}))
                for i in range(messages):
                    assert json.loads(await ws.get_message())["x"] == i
        dispatcher = atlas.runtime.skim
        assert dispatcher is not None
        stats = dispatcher.statistics()
        assert stats.offered == 2 * messages  # both directions, every message
        stuck = {a.name: a for a in stats.analyzers}["stuck"]
        assert stuck.delivered <= 8 + 1  # its channel filled, then everything was dropped for it
        assert stuck.dropped > 0
        await until(lambda: len(RECORDED) >= 10)
        assert {frame.direction for frame in RECORDED} <= {"up", "down"}
        registry = atlas.runtime.metrics.registry
        assert registry.get_sample_value("atlas_skim_offered_total") == 2 * messages
        assert registry.get_sample_value("atlas_skim_analyzer_dropped_total", {"analyzer": "stuck"}) == (
            stuck.dropped
        )
        nursery.cancel_scope.cancel()


async def test_live_tap_streams_a_clients_messages_as_server_sent_events() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_echo_server, "127.0.0.1", 0)
        atlas: AtlasStarted = await nursery.start(serve_atlas, _config(port))
        assert atlas.ops is not None
        async with open_ws(f"ws://127.0.0.1:{atlas.proxy.port}/") as ws:
            (session,) = list(atlas.runtime.clients)
            # A raw HTTP/1.1 request: httpx's streaming generators leak when a test stops reading early.
            tap = await trio.open_tcp_stream("127.0.0.1", atlas.ops.port)
            async with tap:
                request = f"GET /api/v1/clients/{session.client_id}/tap HTTP/1.1\r\nHost: atlas\r\n\r\n"
                await tap.send_all(request.encode())
                received = b""
                with trio.fail_after(10):
                    while b": tapping" not in received:
                        received += await tap.receive_some()
                    assert received.startswith(b"HTTP/1.1 200")
                    assert b"text/event-stream" in received
                    await ws.send_message("hello tap")
                    assert await ws.get_message() == "hello tap"
                    while received.count(b"\ndata: ") < 2:
                        received += await tap.receive_some()
            async with httpx.AsyncClient(base_url=atlas.ops.url, timeout=10) as http:
                missing = await http.get("/api/v1/clients/nobody/tap")
                assert missing.status_code == 404
        events = [
            json.loads(line[len(b"data: ") :]) for line in received.split(b"\n") if line.startswith(b"data: ")
        ]
        assert [(e["direction"], e["text"]) for e in events] == [("up", "hello tap"), ("down", "hello tap")]
        nursery.cancel_scope.cancel()

"""Transfers under load: clients streaming at game-tick rate while Atlas moves them around.

    python benchmarks/transfer_load.py                            # 200 clients x 20 Hz, 1,000 transfers, SDK
    python benchmarks/transfer_load.py --servers plain            # the same among plain (blind) backends
    python benchmarks/transfer_load.py --clients 0 --mass 1000    # 1,000 idle clients moved at once

Five processes, as in a deployment: this one runs Atlas and asks it for the transfers; three children
run one game server each (``--servers-child``) and another the clients (``--clients-child``), so that
none competes with Atlas for its process's time. The children talk to this process in JSON lines: each
game server prints its port once it accepts (then runs until its stdin closes, and prints a last report);
the clients print ``connected`` once all are, start streaming at ``go`` and stop at ``stop``, then print
their report. Every wait is bounded, and every child is killed if it has not exited when this ends.

What is checked. Each client sends numbered messages (``0``, ``1``, ...) at ``--rate``. With SDK servers
the game answers ``seq:count:server``, where ``count`` is the player's message counter: it moves with the
player (``on_transfer_out`` / ``on_transfer_in``), so any loss, duplicate, reordering or lost state shows.
A game server that takes a player in sends it a snapshot at once (``snapshot:count:server``, from
``on_transfer_in``; the SDK sends it right after the commit), as a real game does, so the client-visible
stall measures the cut-over itself rather than the client's own send interval (``--no-snapshot``: none).
Plain backends have no control channel, so Atlas moves their clients *blind* (docs/sdk.md, section 8):
each echoes ``seq:0:server``, greets a link opened for a transfer with ``snapshot:0:server``, and records
per client what came on each link, so that every message is checked to reach exactly one backend, in
order; the answers a source sends after a blind cut are dropped by design ("unanswered"). ``plain`` runs
them on the SDK (its data links only), ``plain-tws`` on trio-websocket. The clients are raw-socket
WebSocket clients (a few lines of framing, one task sending for all) so that the load generator stays
cheap next to what it measures; the report gives every process's CPU time and the load average.

The figures: transfers committed / rolled back (with Atlas's reasons), their duration, *hold* (how long
the client's messages were held: the cut-over's cost to its input), Atlas's *stall* (from the switch to the
first message relayed from the target), and, seen by the clients, the *gap* between the last message from
the old server and the first from the new one (it includes the time since the client's last answer
before the hold: up to one send interval), and the round trip of the first answer from the new one.
"""

from __future__ import annotations

import argparse
import base64
import collections
import contextlib
import gc
import heapq
import itertools
import json
import logging
import os
import random
import re
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

from atlas.config import AdminConfig, Config, ProxyConfig, ServerConfig, SkimConfig, TransferConfig
from atlas.control.coordinator import TransferOutcome, TransferRefused
from atlas.control.lifecycle import TransferReason
from atlas.sdk import TRANSFER_HEADER, GameServer, Player
from atlas.supervisor import AtlasStarted, serve_atlas

SNAPSHOT = "snapshot"

# -- the game servers (child process) ---------------------------------------------------------------


class CounterGame(GameServer):
    """Answers each message with the player's counter, which moves with the player."""

    snapshot = True

    async def on_connect(self, player: Player) -> None:
        player.data["count"] = 0

    async def on_message(self, player: Player, message: str | bytes) -> None:
        player.data["count"] += 1
        await player.send(f"{message!s}:{player.data['count']}:{self.name}")

    async def on_transfer_out(self, player: Player) -> Any:
        return {"count": player.data["count"]}

    async def on_transfer_in(self, player: Player, state: Any) -> None:
        player.data["count"] = state["count"]
        if self.snapshot:
            # Queued by the SDK, sent right after transfer.committed: the arriving player's first message.
            await player.send(f"{SNAPSHOT}:{state['count']}:{self.name}")


class LinkLog:
    """What each client sent on each link to one plain backend, to check order across backends."""

    def __init__(self) -> None:
        # (client, when the link opened (CLOCK_MONOTONIC: comparable across processes), messages).
        self.links: list[tuple[str, float, list[int]]] = []

    def opened(self, client: str) -> list[int]:
        """A link of ``client`` opened now; returns the list to append its messages to."""
        received: list[int] = []
        self.links.append((client, time.monotonic(), received))
        return received

    def summary(self) -> list[tuple[str, float, int, int, bool]]:
        """Per link: client, opened at, first message, how many, whether they were consecutive."""
        return [
            (client, opened, got[0], len(got), got == list(range(got[0], got[0] + len(got))))
            for client, opened, got in self.links
            if got
        ]


class PlainGame(GameServer):
    """A plain backend on the SDK: Atlas has no ``control_url`` for it, so it moves its clients blind.

    It echoes ``seq:0:server`` and greets a link opened for a transfer with ``snapshot:0:server``.
    """

    snapshot = True
    log: LinkLog

    async def on_connect(self, player: Player) -> None:
        player.data["received"] = self.log.opened(player.id)
        if self.snapshot and TRANSFER_HEADER in player.headers:
            await player.send(f"{SNAPSHOT}:0:{self.name}")

    async def on_message(self, player: Player, message: str | bytes) -> None:
        player.data["received"].append(int(message))
        await player.send(f"{message!s}:0:{self.name}")


class PlainRecorder:
    """A plain backend on trio-websocket (``--servers plain-tws``): the same as :class:`PlainGame`."""

    def __init__(self, name: str, snapshot: bool) -> None:
        self.name = name
        self.snapshot = snapshot
        self.log = LinkLog()

    async def handler(self, request: WebSocketRequest) -> None:
        headers = {k.lower(): v for k, v in request.headers}
        client = headers.get(b"x-atlas-client-id", b"").decode()
        received = self.log.opened(client) if client else []
        ws = await request.accept()
        with contextlib.suppress(ConnectionClosed):
            if self.snapshot and b"x-atlas-transfer" in headers:
                await ws.send_message(f"{SNAPSHOT}:0:{self.name}")
            while True:
                message = await ws.get_message()
                received.append(int(message))
                # After Atlas's Close a send fails, yet earlier messages can still be read.
                with contextlib.suppress(ConnectionClosed):
                    await ws.send_message(f"{message!s}:0:{self.name}")


def plain_order_errors(links: list[list[Any]]) -> dict[str, Any]:
    """Every client's messages, over its links in the order they opened, are exactly 0, 1, 2, ..."""
    by_client: dict[str, list[list[Any]]] = collections.defaultdict(list)
    for link in links:
        by_client[link[0]].append(link)
    bad = []
    for client, its in by_client.items():
        its.sort(key=lambda link: link[1])
        expected = 0
        for _client, _opened, first, count, consecutive in its:
            if first != expected or not consecutive:
                bad.append({"client": client, "expected": expected, "link": [first, count, consecutive]})
                break
            expected += count
    return {
        "plain_backend_order_errors": len(bad),
        "messages_checked": sum(link[3] for link in links),
        "examples": bad[:3],
    }


class GcTimer:
    """Time spent in Python's cyclic garbage collector (it shows up in profiles as allocation)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.collections = [0, 0, 0]
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._started
            self.collections[info["generation"]] += 1

    def report(self) -> dict[str, Any]:
        return {"gc_s": round(self.seconds, 3), "gc_collections": self.collections}


async def servers_main(kind: str, name: str, snapshot: bool) -> None:
    """Run one game server; print its port as a JSON line; run until stdin closes; print a report."""
    gc_timer = GcTimer()
    # The SDK logs transfers at INFO: TRANSFER_LOAD_SDK_LOG=INFO shows them (on stderr).
    logging.basicConfig(level=os.environ.get("TRANSFER_LOAD_SDK_LOG", "WARNING"))
    log = LinkLog()
    async with trio.open_nursery() as nursery:
        game: GameServer | None = None
        if kind == "sdk":
            game = CounterGame(name, capacity=100_000)
            game.snapshot = snapshot
            port = await nursery.start(game.serve)
        elif kind == "plain":
            game = PlainGame(name, capacity=100_000)
            game.snapshot, game.log = snapshot, log
            port = await nursery.start(game.serve)
        else:
            recorder = PlainRecorder(name, snapshot)
            recorder.log = log
            server = await nursery.start(serve_websocket, recorder.handler, "127.0.0.1", 0, None)
            port = server.port
        print(json.dumps(port), flush=True)
        stdin = trio.lowlevel.FdStream(os.dup(0))
        async with stdin:
            while await stdin.receive_some():
                pass  # until the parent closes our stdin
        report: dict[str, Any] = {"gc": gc_timer.report()}
        if kind == "sdk" and game is not None:
            report["sdk_statistics"] = _statistics(game)
        else:
            report["plain_links"] = log.summary()
        print(json.dumps(report), flush=True)
        nursery.cancel_scope.cancel()


def _statistics(game: GameServer) -> dict[str, int]:
    stats = game.statistics()
    return {
        "players": stats.players,
        "completed": stats.transfers_completed,
        "committed": stats.transfers_committed,
        "aborted": stats.transfers_aborted,
    }


# -- a lean WebSocket client ---------------------------------------------------------------------------


class RawClient:
    """A WebSocket client in a few lines: enough framing for this benchmark, one read per wake-up.

    Frames are masked with a zero key (valid: the key is any 32 bits), so payloads go as they are.
    """

    def __init__(self, stream: trio.SocketStream, rest: bytes) -> None:
        self.stream = stream
        self.buffer = bytearray(rest)
        self.close_code: int | None = None
        """The code of the server's Close frame, once one came."""
        self.protocol_errors = 0
        self.closing = False
        self._send_lock = trio.Lock()

    @classmethod
    async def connect(cls, host: str, port: int, path: str) -> RawClient:
        stream = await trio.open_tcp_stream(host, port)
        try:
            key = base64.b64encode(os.urandom(16)).decode()
            request = (
                f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            await stream.send_all(request.encode())
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some(65536)
                if not chunk or len(data) > 65536:
                    raise ConnectionError("the handshake did not complete")
                data += chunk
            head, _, rest = data.partition(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace"))
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return cls(stream, rest)

    @staticmethod
    def frame(opcode: int, payload: bytes) -> bytes:
        n = len(payload)
        if n < 126:
            head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 65536:
            head = struct.pack("!BBH", 0x80 | opcode, 0xFE, n)
        else:
            head = struct.pack("!BBQ", 0x80 | opcode, 0xFF, n)
        return head + b"\0\0\0\0" + payload

    async def send_text(self, text: str) -> None:
        await self._send(self.frame(1, text.encode()))

    async def _send(self, data: bytes) -> None:
        """Straight to the non-blocking socket when nothing waits, else (in order) through trio."""
        if not self._send_lock.locked():
            try:
                written = os.write(self.stream.socket.fileno(), data)
            except BlockingIOError:
                written = 0
            except OSError:
                raise trio.BrokenResourceError from None
            if written == len(data):
                return
            data = data[written:]
        async with self._send_lock:
            await self.stream.send_all(data)

    def _frames(self) -> list[tuple[int, bytes]]:
        out = []
        buf = self.buffer
        pos = 0
        while len(buf) - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            n = b1 & 0x7F
            at = pos + 2
            if n == 126:
                if len(buf) - at < 2:
                    break
                n = struct.unpack_from("!H", buf, at)[0]
                at += 2
            elif n == 127:
                if len(buf) - at < 8:
                    break
                n = struct.unpack_from("!Q", buf, at)[0]
                at += 8
            if len(buf) - at < n:
                break
            if not b0 & 0x80 or b1 & 0x80:
                self.protocol_errors += 1  # fragmented or masked: not what Atlas should send here
            out.append((b0 & 0x0F, bytes(buf[at : at + n])))
            pos = at + n
        del buf[:pos]
        return out

    async def messages(self) -> AsyncIterator[list[bytes]]:
        """Yield the data messages of each read; ends at the server's Close (answered) or EOF."""
        while True:
            frames = self._frames()
            batch: list[bytes] = []
            for opcode, payload in frames:
                if opcode == 0x8:
                    if not self.closing:  # the server closed first: answer
                        self.close_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                        self.closing = True
                        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                            await self._send(self.frame(0x8, payload[:2]))
                    if batch:
                        yield batch
                    return
                if opcode == 0x9:
                    await self._send(self.frame(0xA, payload))
                elif opcode in (0x1, 0x2):
                    batch.append(payload)
            if batch:
                yield batch
            try:
                chunk = await self.stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not chunk:
                return
            self.buffer += chunk

    async def close(self, reader_done: trio.Event) -> None:
        """Send Close 1000 unless the server closed first; await its answer (bounded); close the socket."""
        with trio.move_on_after(2), contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            if not self.closing:
                self.closing = True
                await self._send(self.frame(0x8, struct.pack("!H", 1000)))
            await reader_done.wait()
        await trio.aclose_forcefully(self.stream)


# -- the clients (child process) ------------------------------------------------------------------------


class Lines:
    """JSON lines over a byte stream (a child's stdout, or our stdin), each read bounded by the caller."""

    def __init__(self, stream: trio.abc.ReceiveStream) -> None:
        self.stream = stream
        self.buffer = b""

    async def line(self) -> str | None:
        """The next line, or None at EOF."""
        while b"\n" not in self.buffer:
            chunk = await self.stream.receive_some(65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line.decode()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def quantiles_ms(values: list[float]) -> dict[str, float]:
    """p50, p99 and max of ``values`` (seconds), in milliseconds."""
    if not values:
        return {}
    return {
        "p50": round(pct(values, 0.5) * 1000, 2),
        "p99": round(pct(values, 0.99) * 1000, 2),
        "max": round(max(values) * 1000, 2),
        "n": len(values),
    }


class StreamingClient:
    """One client: numbered messages at ``rate``, every answer kept with its arrival time."""

    def __init__(self, ws: RawClient) -> None:
        self.ws = ws
        self.sent_at: list[float] = []
        self.late: list[float] = []
        # (seq, count, server, arrival); seq is -1 for a snapshot.
        self.got: list[tuple[int, int, str, float]] = []
        self.answers = 0
        self.bad_messages = 0
        self.broken = False
        self.reader_done = trio.Event()

    async def read(self) -> None:
        try:
            await self._read()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True
        finally:
            self.reader_done.set()

    async def _read(self) -> None:
        async for batch in self.ws.messages():
            now = trio.current_time()
            for payload in batch:
                try:
                    seq, count, server = payload.decode().split(":")
                    self.got.append((-1 if seq == SNAPSHOT else int(seq), int(count), server, now))
                    self.answers += seq != SNAPSHOT
                except ValueError:
                    self.bad_messages += 1

    async def send_next(self, due: float) -> None:
        """Send the next numbered message (``due``: when it was meant to go); not once the link broke."""
        if self.broken:
            return
        now = trio.current_time()
        self.late.append(now - due)
        self.sent_at.append(now)
        try:
            await self.ws.send_text(str(len(self.sent_at) - 1))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self.broken = True

    def report(self, sdk: bool) -> dict[str, Any]:
        sent = len(self.sent_at)
        replies = [g for g in self.got if g[0] >= 0]
        seqs = [g[0] for g in replies]
        state_errors = 0
        for i, (seq, count, _server, _at) in enumerate(self.got):
            if seq >= 0:
                state_errors += count != (seq + 1 if sdk else 0)
            else:
                # A snapshot carries the counter after every message answered before it.
                answered = sum(1 for g in self.got[:i] if g[0] >= 0)
                state_errors += count != (answered if sdk else 0)
        gaps, first_rtts = [], []
        for i in range(1, len(self.got)):
            if self.got[i][2] != self.got[i - 1][2]:
                gaps.append(self.got[i][3] - self.got[i - 1][3])
                first = next((g for g in self.got[i:] if g[0] >= 0), None)
                if first is not None and first[2] == self.got[i][2]:
                    first_rtts.append(first[3] - self.sent_at[first[0]])
        return {
            "sent": sent,
            "received": len(replies),
            "snapshots": len(self.got) - len(replies),
            "unanswered": len(set(range(sent)) - set(seqs)),
            "duplicated": len(seqs) - len(set(seqs)),
            "reordered": sum(1 for a, b in itertools.pairwise(seqs) if b < a),
            "state_errors": state_errors,
            "bad_messages": self.bad_messages + self.ws.protocol_errors,
            "switches": len(gaps),
            "rtt": [g[3] - self.sent_at[g[0]] for g in replies if g[0] < sent],
            "gap": gaps,
            "first_rtt": first_rtts,
            "late": self.late,
        }


async def send_all_clients(clients: list[StreamingClient], rate: float, stop: trio.Event) -> None:
    """Every client sends at ``rate``, each at its own phase, from one task (one wake-up per ms at most).

    Bounded by ``stop`` (the caller also bounds the time).
    """
    start = trio.current_time()
    due = [(start + random.random() / rate, i) for i in range(len(clients))]
    heapq.heapify(due)
    while due and not stop.is_set():
        at = due[0][0]
        await trio.sleep_until(at)
        now = trio.current_time() + 0.001  # what is due within the next ms goes now
        while due and due[0][0] <= now:
            at, i = heapq.heappop(due)
            await clients[i].send_next(at)
            heapq.heappush(due, (at + 1 / rate, i))


async def connect_all(url: str, count: int) -> list[RawClient]:
    """Connect ``count`` clients, 50 at a time (bounded: 120 s in all)."""
    host_port, _, path = url.removeprefix("ws://").partition("/")
    host, _, port = host_port.rpartition(":")
    clients: list[RawClient] = []
    limit = trio.CapacityLimiter(50)

    async def one() -> None:
        async with limit:
            clients.append(await RawClient.connect(host, int(port), "/" + path))

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(one)
    return clients


async def clients_main(url: str, mode: str, count: int, rate: float, sdk: bool, cap: float) -> None:
    """Connect ``count`` clients; print ``connected``; stream (mode ``stream``) from ``go`` to ``stop``.

    Mode ``idle``: the clients only read. Either way they end at ``stop`` (or stdin's EOF, or after ``cap``
    seconds), wait (bounded) for the last answers, close, and one JSON report is printed.
    """
    ws_list = await connect_all(url, count)
    print(json.dumps({"connected": len(ws_list)}), flush=True)
    clients = [StreamingClient(ws) for ws in ws_list]
    stop = trio.Event()
    stdin_stream = trio.lowlevel.FdStream(os.dup(0))
    stdin = Lines(stdin_stream)
    closed_early = 0
    async with stdin_stream, trio.open_nursery() as nursery:
        for client in clients:
            nursery.start_soon(client.read)
        with trio.move_on_after(cap):
            if mode == "stream":
                if await stdin.line() != "go":
                    raise SystemExit("expected go")
                async with trio.open_nursery() as senders:
                    senders.start_soon(send_all_clients, clients, rate, stop)
                    await stdin.line()  # "stop", or EOF
                    stop.set()
            else:
                await stdin.line()
        stop.set()
        closed_early = sum(1 for c in clients if c.ws.close_code is not None)
        with trio.move_on_after(5):  # the last answers are in flight
            for client in clients:
                while client.answers < len(client.sent_at):  # noqa: ASYNC110
                    await trio.sleep(0.01)
        async with trio.open_nursery() as closing:
            for client in clients:
                closing.start_soon(client.ws.close, client.reader_done)
        nursery.cancel_scope.cancel()
    reports = [client.report(sdk) for client in clients]
    summary: dict[str, Any] = {
        key: sum(r[key] for r in reports)
        for key in (
            "sent",
            "received",
            "snapshots",
            "unanswered",
            "duplicated",
            "reordered",
            "state_errors",
            "bad_messages",
            "switches",
        )
    }
    summary["closed_by_server"] = closed_early
    summary["broken"] = sum(1 for c in clients if c.broken)
    for key in ("rtt", "gap", "first_rtt", "late"):
        summary[f"{key}_ms"] = quantiles_ms([v for r in reports for v in r[key]])
    print(json.dumps(summary), flush=True)


# -- child processes ------------------------------------------------------------------------------------


class Child:
    """A child process of this benchmark, spoken to in lines on its stdin and stdout."""

    def __init__(self, process: trio.Process) -> None:
        assert process.stdin is not None and process.stdout is not None
        self.process = process
        self.stdin = process.stdin
        self.lines = Lines(process.stdout)

    async def send(self, line: str) -> None:
        await self.stdin.send_all(line.encode() + b"\n")

    async def read_json(self, seconds: float) -> Any:
        """The next JSON line; RuntimeError at EOF, TooSlowError after ``seconds``."""
        with trio.fail_after(seconds):
            line = await self.lines.line()
        if line is None:
            raise RuntimeError(f"child {self.process.args!r} exited early")
        return json.loads(line)

    def cpu_seconds(self) -> float:
        """User + system CPU time so far (Linux ``/proc``; NaN elsewhere)."""
        return cpu_seconds(self.process.pid)


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def open_child(*args: str) -> AsyncIterator[Child]:
    """Start ``transfer_load.py *args``; on exit close its stdin, wait (bounded), kill if still alive."""
    process = await trio.lowlevel.open_process(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        yield Child(process)
    finally:
        with trio.CancelScope(shield=True):
            assert process.stdin is not None
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await process.stdin.aclose()
            with trio.move_on_after(10):
                await process.wait()
            if process.returncode is None:
                process.kill()
                with trio.move_on_after(5):
                    await process.wait()


async def until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    """Wait (polling, bounded) for state inside Atlas that no event announces."""
    for _ in range(int(seconds / 0.01)):
        if condition():
            return
        await trio.sleep(0.01)
    raise RuntimeError(f"timed out waiting for {what}")


# -- Atlas (this process) ---------------------------------------------------------------------------------


def summarize(outcomes: list[TransferOutcome]) -> dict[str, Any]:
    """Committed / rolled back (with reasons), and duration, hold and Atlas's stall of the committed."""
    committed = [o for o in outcomes if o.committed]
    reasons = collections.Counter(
        re.sub(r"client \S+", "client X", o.failure or "?") for o in outcomes if not o.committed
    )
    return {
        "committed": len(committed),
        "rolled_back": len(outcomes) - len(committed),
        "rolled_back_why": dict(reasons.most_common(8)),
        "duration_ms": quantiles_ms([o.duration for o in committed]),
        "hold_ms": quantiles_ms([o.hold for o in committed if o.hold is not None]),
        "stall_ms": quantiles_ms([o.stall for o in committed if o.stall is not None]),
        "stall_unknown": sum(1 for o in committed if o.stall is None),
    }


class Usage:
    """CPU time of Atlas (this process), the game servers (together) and the clients over a window."""

    def __init__(self, games: list[Child], clients: Child) -> None:
        self.games, self.clients = games, clients
        self.start = self._sample()

    def _sample(self) -> tuple[float, float, float, float]:
        return (
            time.perf_counter(),
            time.process_time(),
            sum(game.cpu_seconds() for game in self.games),
            self.clients.cpu_seconds(),
        )

    def report(self) -> dict[str, Any]:
        end = self._sample()
        wall = end[0] - self.start[0]
        cpu = {name: end[i] - self.start[i] for i, name in ((1, "atlas"), (2, "games"), (3, "clients"))}
        return {
            "window_s": round(wall, 2),
            "cpu_s": {name: round(value, 2) for name, value in cpu.items()},
            "cores": {name: round(value / wall, 2) for name, value in cpu.items()},
        }


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (the machine is shared: read every figure with them)."""
    return "{:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


async def run_load(
    args: argparse.Namespace, atlas: AtlasStarted, url: str, games: list[Child]
) -> dict[str, Any]:
    """Stream from ``args.clients`` clients while ``args.transfers`` transfers run at an even pace."""
    names = [s.name for s in atlas.runtime.config.servers]
    sdk = "1" if args.servers == "sdk" else "0"
    async with open_child(
        "--clients-child", url, "stream", str(args.clients), str(args.rate), sdk, str(args.seconds + 120)
    ) as clients:
        await clients.read_json(seconds=120)
        await until(lambda: len(atlas.runtime.clients) >= args.clients, 30, "the clients' sessions")
        rng = random.Random(1)
        outcomes: list[TransferOutcome] = []
        refused: collections.Counter[str] = collections.Counter()
        usage = Usage(games, clients)
        load_before = load_average()
        print(f"streaming; {args.transfers} transfers over {args.seconds:g} s", file=sys.stderr, flush=True)
        await clients.send("go")
        await trio.sleep(args.warmup)  # streaming before the first transfer

        sessions = list(atlas.runtime.clients)  # they stay (a client that drops is counted as closed)

        async def one_transfer() -> None:
            # A random client that is not being moved (a few tries, not a scan of all in Atlas's process).
            active = atlas.transfers.active
            picks = (rng.choice(sessions) for _ in range(50))
            session = next((s for s in picks if s.client_id not in active), None)
            if session is None:
                refused["no idle client"] += 1
                return
            target = rng.choice([n for n in names if n != session.link.backend.name])
            try:
                outcome = await atlas.transfers.transfer(session.client_id, target, TransferReason.ADMIN)
            except TransferRefused as exc:
                refused[re.sub(r"client \S+", "client X", str(exc))] += 1
            else:
                outcomes.append(outcome)

        started = trio.current_time()
        interval = args.seconds / max(1, args.transfers)
        async with trio.open_nursery() as movers:
            for i in range(args.transfers):
                movers.start_soon(one_transfer)
                await trio.sleep_until(started + (i + 1) * interval)
        window = trio.current_time() - started
        await trio.sleep(args.tail)  # streaming after the last transfer ended
        cpu = usage.report()
        await clients.send("stop")
        client_report = await clients.read_json(seconds=60)
    return {
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "transfers_asked": args.transfers,
        "transfers_refused": dict(refused),
        "transfer_window_s": round(window, 2),
        **summarize(outcomes),
        "clients": client_report,
        "usage": cpu,
    }


async def run_mass(
    args: argparse.Namespace, atlas: AtlasStarted, url: str, games: list[Child]
) -> dict[str, Any]:
    """Connect ``args.mass`` idle clients to the first server, then move them all to the second at once."""
    names = [s.name for s in atlas.runtime.config.servers]
    first, second = names[0], names[1]
    for name in names[1:]:
        atlas.runtime.drain_backend(name)  # new clients all land on the first server
    sdk = "1" if args.servers == "sdk" else "0"
    async with open_child("--clients-child", url, "idle", str(args.mass), "0", sdk, "600") as clients:
        await clients.read_json(seconds=180)
        await until(lambda: len(atlas.runtime.clients) >= args.mass, 30, "the idle clients' sessions")
        for name in names[1:]:
            backend = atlas.runtime.pool.get(name)
            assert backend is not None
            atlas.runtime.health.backend_resumed(backend)
        sessions = [s for s in atlas.runtime.clients if s.link.backend.name == first]
        outcomes: list[TransferOutcome] = []
        refused: collections.Counter[str] = collections.Counter()

        async def move(client_id: str) -> None:
            try:
                outcomes.append(await atlas.transfers.transfer(client_id, second, TransferReason.MAINTENANCE))
            except TransferRefused as exc:
                refused[str(exc)] += 1

        usage = Usage(games, clients)
        load_before = load_average()
        print(f"moving {len(sessions)} clients from {first} to {second}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        async with trio.open_nursery() as movers:
            for session in sessions:
                movers.start_soon(move, session.client_id)
        elapsed = time.perf_counter() - started
        cpu = usage.report()
        await clients.send("stop")
        client_report = await clients.read_json(seconds=60)
    return {
        "load_average_before": load_before,
        "load_average_after": load_average(),
        "clients": len(sessions),
        "seconds": round(elapsed, 3),
        "refused": dict(refused),
        **summarize(outcomes),
        "client_side": {
            k: client_report[k] for k in ("snapshots", "state_errors", "bad_messages", "closed_by_server")
        },
        "usage": cpu,
    }


async def main(args: argparse.Namespace) -> int:
    kind = args.servers
    snapshot = "0" if args.no_snapshot else "1"
    report: dict[str, Any] = {"servers": kind, "snapshot": not args.no_snapshot, "started": time.ctime()}
    async with contextlib.AsyncExitStack() as stack:
        # One process per game server, as in a deployment; each prints its port once it accepts.
        games = [
            await stack.enter_async_context(open_child("--servers-child", kind, f"gs-{i + 1}", snapshot))
            for i in range(3)
        ]
        ports = [await game.read_json(seconds=30) for game in games]
        servers = []
        for i, port in enumerate(ports):
            name = f"gs-{i + 1}"
            if kind == "sdk":
                control = f"ws://127.0.0.1:{port}/atlas/control"
                server = ServerConfig(
                    name=name, url=f"ws://127.0.0.1:{port}/play", control_url=control, capacity=100_000
                )
            else:  # no control_url: Atlas moves the clients blind
                server = ServerConfig(name=name, url=f"ws://127.0.0.1:{port}/play", capacity=100_000)
            servers.append(server)
        config = Config(
            proxy=ProxyConfig(listen="127.0.0.1:0", max_connections=100_000),
            admin=AdminConfig(listen="127.0.0.1:0"),
            servers=tuple(servers),
            transfer=TransferConfig(timeout=args.timeout),
            skim=SkimConfig(enabled=not args.no_skim),
        )
        async with trio.open_nursery() as nursery:
            atlas: AtlasStarted = await nursery.start(serve_atlas, config)
            if kind == "sdk":
                await until(
                    lambda: all(atlas.transfers.channels.get(s.name) for s in servers), 10, "control channels"
                )
            url = f"ws://127.0.0.1:{atlas.proxy.port}/play"
            if args.clients:
                report["load"] = await run_load(args, atlas, url, games)
            if args.mass:
                report["mass"] = await run_mass(args, atlas, url, games)
            nursery.cancel_scope.cancel()
        finals = []
        for game in games:
            await game.stdin.aclose()  # the game server reports and exits
            with contextlib.suppress(RuntimeError, trio.TooSlowError):
                finals.append(await game.read_json(seconds=30))
    report["games_gc"] = [final.get("gc") for final in finals]
    if kind == "sdk":
        report["sdk_statistics"] = [final.get("sdk_statistics") for final in finals]
    else:
        report |= plain_order_errors([link for final in finals for link in final["plain_links"]])
        if "load" in report:
            # Every message a client sent reached exactly one backend (checked in order above).
            report["plain_messages_missing"] = report["load"]["clients"]["sent"] - report["messages_checked"]
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--servers-child":
        trio.run(servers_main, sys.argv[2], sys.argv[3], sys.argv[4] == "1")
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--clients-child":
        url, mode, count, rate, sdk, cap = sys.argv[2:8]
        trio.run(clients_main, url, mode, int(count), float(rate), sdk == "1", float(cap))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--servers",
        choices=["sdk", "plain", "plain-tws"],
        default="sdk",
        help="SDK game servers; plain backends (SDK links, no control channel); plain on trio-websocket",
    )
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--transfers", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=30.0, help="the transfers' window (an even pace)")
    parser.add_argument("--warmup", type=float, default=1.0, help="streaming before the first transfer")
    parser.add_argument("--tail", type=float, default=1.0, help="streaming after the last transfer")
    parser.add_argument("--timeout", type=float, default=5.0, help="Atlas's [transfer] timeout")
    parser.add_argument("--mass", type=int, default=0, help="then move this many idle clients at once")
    parser.add_argument("--no-skim", action="store_true")
    parser.add_argument("--no-snapshot", action="store_true", help="arriving players get no snapshot")
    sys.exit(trio.run(main, parser.parse_args()))

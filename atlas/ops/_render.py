"""Plain-text renderings of admin API answers for the terminal: aligned tables and short summaries."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "render_clients",
    "render_drain",
    "render_servers",
    "render_status",
    "render_transfer",
    "table",
]


def table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: frozenset[int] = frozenset()
) -> str:
    """Columns padded to their widest cell, two spaces apart; columns in ``right`` right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        padded = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(padded).rstrip()

    return "\n".join([line(headers), *(line(row) for row in rows)])


def _duration(seconds: float) -> str:
    total = int(seconds)
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h {minutes:02d}m"
    if hours:
        return f"{hours}h {minutes:02d}m {secs:02d}s"
    if minutes:
        return f"{minutes}m {secs:02d}s"
    return f"{secs}s"


def render_status(status: dict[str, Any]) -> str:
    """``atlas status``: one aligned ``key  value`` line per fact."""
    servers = status["servers"]
    totals = status["totals"]
    states = ("healthy", "unhealthy", "ejected", "draining")
    by_state = ", ".join(f"{servers.get(s, 0)} {s}" for s in states if servers.get(s, 0)) or "none"
    rows = [
        ("version", str(status["version"])),
        ("uptime", _duration(float(status["uptime"]))),
        ("accepting", "yes" if status["accepting"] else "no (draining)"),
        ("clients", f"{status['clients']} live, {totals['accepted']} accepted, {totals['refused']} refused"),
        ("servers", f"{servers['total']} ({by_state}), {servers['available']} available"),
        ("connections", f"{servers['connections']} of {servers['capacity']} capacity"),
        ("messages", f"{totals['messages_up']} up, {totals['messages_down']} down"),
        ("bytes", f"{totals['bytes_up']} up, {totals['bytes_down']} down"),
    ]
    width = max(len(key) for key, _ in rows)
    return "\n".join(f"{key.ljust(width)}  {value}" for key, value in rows)


def render_servers(servers: list[dict[str, Any]]) -> str:
    """``atlas servers``: one row per backend."""
    if not servers:
        return "no servers"
    rows = [
        (
            s["name"],
            s["state"],
            str(s["connections"]),
            str(s["capacity"]),
            str(s["weight"]),
            "yes" if s.get("registered") else "no",
            s["url"],
            ",".join(s["tags"]) or "-",
        )
        for s in servers
    ]
    headers = ("NAME", "STATE", "CLIENTS", "CAPACITY", "WEIGHT", "REGISTERED", "URL", "TAGS")
    return table(headers, rows, right=frozenset({2, 3, 4}))


def render_clients(clients: list[dict[str, Any]]) -> str:
    """``atlas clients``: one row per live client."""
    if not clients:
        return "no clients"
    rows = [
        (
            c["id"],
            c.get("player") or "-",
            c["peer"],
            c["server"],
            c["connected_at"],
            str(c["messages_up"]),
            str(c["messages_down"]),
            str(c["bytes_up"]),
            str(c["bytes_down"]),
        )
        for c in clients
    ]
    headers = ("ID", "PLAYER", "PEER", "SERVER", "CONNECTED", "MSG UP", "MSG DOWN", "BYTES UP", "BYTES DOWN")
    return table(headers, rows, right=frozenset({5, 6, 7, 8}))


def render_drain(server: dict[str, Any]) -> str:
    """``atlas drain NAME``: the server's new state and how many clients it still has."""
    left = server["connections"]
    return f"{server['name']}: {server['state']}, {left} client{'' if left == 1 else 's'} left"


def render_transfer(outcome: dict[str, Any]) -> str:
    """``atlas transfer CLIENT SERVER``: ``committed in 3.2 ms`` or ``rolled back: <why>``."""
    if outcome["outcome"] == "committed":
        return f"committed in {float(outcome['duration_ms']):.1f} ms"
    return f"rolled back: {outcome.get('failure') or 'unknown reason'}"

"""The dashboard page in a real browser (headless Chromium): it reads the admin API and shows live data.

`.ci/run` installs Debian's chromium; without a Chromium on PATH the test is skipped.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import trio

from atlas.config import AdminConfig, Config, ProxyConfig, ServerConfig
from atlas.demo.servers import serve_echo_server
from atlas.supervisor import AtlasStarted, serve_atlas
from tests.wsclient import open_ws

BROWSER = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _dump_dom(url: str, profile: Path) -> str:
    """The page's DOM after its scripts ran (virtual time: the first refresh has answered)."""
    command = [
        str(BROWSER),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=3000",
        "--dump-dom",
        url,
    ]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.skipif(BROWSER is None, reason="no Chromium on PATH (.ci/run installs it)")
async def test_the_dashboard_shows_servers_and_clients_in_a_browser(tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(serve_echo_server, "127.0.0.1", 0) for _ in range(2)]
        config = Config(
            proxy=ProxyConfig(listen="127.0.0.1:0"),
            admin=AdminConfig(listen="127.0.0.1:0"),
            servers=tuple(
                ServerConfig(name=f"gs-{i + 1}", url=f"ws://127.0.0.1:{port}") for i, port in enumerate(ports)
            ),
        )
        atlas: AtlasStarted = await nursery.start(serve_atlas, config)
        assert atlas.ops is not None
        url = f"ws://127.0.0.1:{atlas.proxy.port}/"
        async with open_ws(url) as first, open_ws(url) as second:
            for ws in (first, second):
                await ws.send_message("hello")
                assert await ws.get_message() == "hello"
            page = f"http://127.0.0.1:{atlas.ops.port}/dashboard"
            dom = await trio.to_thread.run_sync(_dump_dom, page, tmp_path / "profile")
            ids = [session.client_id for session in atlas.runtime.clients]
        nursery.cancel_scope.cancel()
    summary = re.search(r'<div id="summary">([^<]*)</div>', dom)
    assert summary is not None
    assert "2 clients, 2 of 2 servers available" in summary.group(1)
    for name in ("gs-1", "gs-2"):
        assert f"<td>{name}</td>" in dom
    for client_id in ids:
        assert f"<td>{client_id}</td>" in dom
    assert "Clients <span" in dom and "(2)" in dom
    assert '<div id="error"></div>' in dom  # no error shown

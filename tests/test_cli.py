"""The ``atlas`` command line, run as a real process: exit codes, one-line errors, signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import trio

from atlas.config import Config

ATLAS = [sys.executable, "-m", "atlas"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ATLAS, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


def test_init_writes_a_default_config_that_check_accepts(tmp_path: Path) -> None:
    target = tmp_path / "atlas.toml"
    result = run_cli("init", str(target))
    assert result.returncode == 0, result.stderr
    assert Config.from_file(target) == Config.default()
    checked = run_cli("check", str(target))
    assert checked.returncode == 0
    assert checked.stdout.strip() == f"ok: {target}"


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    target = tmp_path / "atlas.toml"
    target.write_text("# mine\n")
    result = run_cli("init", str(target))
    assert result.returncode == 1
    assert "exists (use --force)" in result.stderr
    assert target.read_text() == "# mine\n"
    assert run_cli("init", "--force", str(target)).returncode == 0


def test_check_reports_path_and_reason_without_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[proxy]\nlisten = "nowhere"\n\n[[servers]]\nname = "a"\nurl = "http://127.0.0.1:1"\n')
    result = run_cli("check", str(bad))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert any(line.startswith("proxy.listen: ") for line in lines), lines
    assert "servers[0].url: not a ws:// or wss:// URL" in lines
    assert "Traceback" not in result.stderr


def test_check_reads_the_files_start_up_would(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    config = tmp_path / "auth.toml"
    config.write_text(f'[auth]\nenabled = true\nalgorithms = ["RS256"]\npublic_key_file = "{missing}"\n')
    result = run_cli("check", str(config))
    assert result.returncode == 1
    assert result.stderr.strip() == f"auth.public_key_file: cannot read {missing}: No such file or directory"
    tls = tmp_path / "tls.toml"
    tls.write_text(f'[proxy]\ntls_cert = "{missing}"\ntls_key = "{missing}"\n')
    result = run_cli("check", str(tls))
    assert result.returncode == 1
    assert result.stderr.strip() == f"proxy.tls_cert: cannot read {missing}: No such file or directory"


def test_serve_with_a_bad_config_exits_1_with_the_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[balancer]\nalgorithm = 'fastest'\n")
    result = run_cli("serve", "--config", str(bad))
    assert result.returncode == 1
    assert "balancer.algorithm: must be one of" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_on_a_busy_port_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    import socket

    config = tmp_path / "atlas.toml"
    config.write_text('[admin]\nlisten = "127.0.0.1:0"\n')
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--config", str(config), "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"atlas: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert "Traceback" not in result.stderr


def test_serve_with_a_missing_tls_file_prints_one_line_and_exits_1(tmp_path: Path) -> None:
    config = tmp_path / "atlas.toml"
    missing = tmp_path / "cert.pem"
    config.write_text(
        f'[proxy]\nlisten = "127.0.0.1:0"\ntls_cert = "{missing}"\ntls_key = "{missing}"\n'
        '[admin]\nlisten = "127.0.0.1:0"\n'
    )
    result = run_cli("serve", "--config", str(config))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"atlas: error: proxy.tls_cert: cannot read {missing}: No such file or directory"
    ]
    only_cert = tmp_path / "only-cert.toml"
    only_cert.write_text('[proxy]\ntls_cert = "cert.pem"\n')
    result = run_cli("serve", "--config", str(only_cert))
    assert result.returncode == 1
    expected = "atlas: config error: proxy.tls_key: required with tls_cert"
    assert result.stderr.strip().splitlines() == [expected]


async def test_serve_drains_and_exits_0_on_sigterm(tmp_path: Path) -> None:
    config = tmp_path / "atlas.toml"
    config.write_text(
        '[proxy]\nlisten = "127.0.0.1:0"\ndrain_timeout = 2.0\n[admin]\nlisten = "127.0.0.1:0"\n'
    )
    process = await trio.lowlevel.open_process(
        [*ATLAS, "serve", "--config", str(config)],
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stderr is not None
    output = b""
    try:
        with trio.fail_after(30):
            # Readiness: the "listening on" line, never a fixed sleep.
            while b"listening on" not in output:
                chunk = await process.stderr.receive_some()
                assert chunk, output
                output += chunk
            process.send_signal(signal.SIGTERM)
            while chunk := await process.stderr.receive_some():
                output += chunk
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await process.stderr.aclose()
    assert b"SIGTERM received: draining" in output

#!/usr/bin/env python3
"""Benchmark driver for Atlas: echo backend + Node load generator + proxies under test.

    python benchmarks/run.py                       # direct, nginx, haproxy, atlas; all scenarios
    python benchmarks/run.py --quick               # short smoke run
    python benchmarks/run.py --targets direct,nginx,haproxy --scenarios throughput,tick

Targets: direct (no proxy), nginx (1 worker), haproxy (1 process, nbthread 1,
mode http) and atlas (default config).  nginx and haproxy are installed with
apt-get when missing (as root; --no-install turns this off).  Standard library
only.  Everything runs on 127.0.0.1; every process this script starts runs in
its own process group and is killed when the script exits.
See benchmarks/README.md for what each number means.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
NODE_DIR = BENCH_DIR / "node"
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
LOADGEN = NODE_DIR / "loadgen.js"
ECHO = NODE_DIR / "echo.js"

CLK_TCK = os.sysconf("SC_CLK_TCK")
NCPU = os.cpu_count() or 1
HOST = "127.0.0.1"

ALL_SCENARIOS = ("throughput", "tick", "connections")
TIMES = "\u00d7"  # multiplication sign, for "1.23x nginx"
SATURATED = 0.90  # fraction of one core above which a single-threaded process is the bottleneck


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


class BenchError(Exception):
    """A failure that ends one target (or the run) with a message instead of a traceback."""


# ---------------------------------------------------------------------------
# /proc helpers
# ---------------------------------------------------------------------------


def _stat_fields(path: str) -> list[str] | None:
    try:
        with open(path, "rb") as f:
            data = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # fields after "(comm)"; comm may contain spaces and parentheses
    return data[data.rfind(")") + 2 :].split()


def cpu_ticks(pid: int) -> int:
    """utime + stime of a whole process (all its threads), in clock ticks."""
    f = _stat_fields(f"/proc/{pid}/stat")
    if f is None:
        return 0
    return int(f[11]) + int(f[12])  # fields 14 and 15 of stat(5)


def thread_ticks(pid: int) -> dict[int, int]:
    out: dict[int, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        f = _stat_fields(f"/proc/{pid}/task/{tid}/stat")
        if f is not None:
            out[int(tid)] = int(f[11]) + int(f[12])
    return out


def rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def process_tree(root: int) -> list[int]:
    """root and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        f = _stat_fields(f"/proc/{entry}/stat")
        if f is None:
            continue
        children.setdefault(int(f[1]), []).append(int(entry))
    if not os.path.exists(f"/proc/{root}"):
        return []
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def machine_cpu() -> tuple[int, int, int]:
    """(total, idle, irq+softirq) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat") as f:
        parts = f.readline().split()
    vals = [int(x) for x in parts[1:]] + [0] * 8
    idle = vals[3] + vals[4]
    total = sum(vals[:8])  # user..steal; guest is already counted in user
    return total, idle, vals[5] + vals[6]


def machine_busy_cores(interval: float) -> float:
    a = machine_cpu()
    time.sleep(interval)
    b = machine_cpu()
    tot = b[0] - a[0]
    return (tot - (b[1] - a[1])) / tot * NCPU if tot > 0 else 0.0


def wait_for_quiet(limit_s: float, threshold: float = 0.25) -> float | None:
    """Wait (at most limit_s) until the machine is nearly idle; returns the last busy reading."""
    deadline = time.monotonic() + limit_s
    busy = machine_busy_cores(0.5)
    announced = False
    while busy > threshold and time.monotonic() < deadline:
        if not announced:
            log(
                f"machine busy ({busy:.2f} cores used by other work); "
                f"waiting up to {limit_s:.0f}s for it to calm down"
            )
            announced = True
        busy = machine_busy_cores(1.0)
    return busy


def loadavg() -> list[float]:
    with open("/proc/loadavg") as f:
        return [float(x) for x in f.read().split()[:3]]


# ---------------------------------------------------------------------------
# Process management
# ---------------------------------------------------------------------------


class ProcessSet:
    """Processes started by the harness, each in its own process group."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, start_new_session=True, **kw)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout)
        # the leader may be gone while group members (e.g. nginx workers) live on
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(2)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.procs)):
            self.stop(proc)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_for_port(
    port: int, proc: subprocess.Popen[bytes], timeout: float, what: str, log_path: Path | None
) -> None:
    """Poll a TCP connect to HOST:port until it succeeds; bounded, fails early if proc dies."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode} before listening{_tail(log_path)}")
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise BenchError(
                f"{what} did not accept connections on {HOST}:{port} within {timeout:.0f}s{_tail(log_path)}"
            )
        time.sleep(0.05)


def _tail(path: Path | None, lines: int = 15) -> str:
    if path is None or not path.exists():
        return ""
    text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    return ("\n    " + "\n    ".join(text)) if text else ""


# ---------------------------------------------------------------------------
# Installing what is missing
# ---------------------------------------------------------------------------


def ensure_node_deps() -> str:
    node = shutil.which("node")
    if not node:
        raise BenchError("node is not on PATH (Node >= 18 is needed for the echo backend and load generator)")
    if not (NODE_DIR / "node_modules" / "ws" / "package.json").exists():
        npm = shutil.which("npm")
        if not npm:
            raise BenchError("npm is not on PATH and benchmarks/node/node_modules is missing")
        cmd = [
            npm,
            "ci" if (NODE_DIR / "package-lock.json").exists() else "install",
            "--no-audit",
            "--no-fund",
        ]
        log(f"installing Node dependencies: {' '.join(cmd[1:])} (in {NODE_DIR})")
        r = subprocess.run(
            cmd,
            cwd=NODE_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=300,
            check=False,
        )
        if r.returncode != 0:
            raise BenchError(f"npm failed:\n{r.stdout[-2000:]}")
    return node


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (
            p
            for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
            if os.access(p, os.X_OK)
        ),
        None,
    )


def _apt_install(what: str, packages: tuple[str, ...], find: Callable[[], str | None]) -> str:
    """Install the first of ``packages`` that apt-get can install; return ``find()`` afterwards.

    Tries without ``apt-get update`` first (fast when the package lists are current),
    then once more after ``apt-get update``.  Every step has a time limit.
    """
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise BenchError(
            f"{what} is not installed (install {' or '.join(packages)}, or run as root with apt-get)"
        )
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    last = ""
    for attempt in range(2):
        if attempt == 1:
            log("apt-get update")
            subprocess.run(
                ["apt-get", "update", "-qq"],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=300,
                check=False,
            )
        for pkg in packages:
            log(f"installing {pkg} with apt-get")
            r = subprocess.run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", pkg],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=600,
                check=False,
            )
            path = find()
            if r.returncode == 0 and path:
                return path
            last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else f"exit {r.returncode}"
    raise BenchError(f"could not install {what} with apt-get ({last})")


def ensure_nginx() -> str:
    return find_nginx() or _apt_install("nginx", ("nginx-light", "nginx"), find_nginx)


def find_haproxy() -> str | None:
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if os.access(p, os.X_OK)),
        None,
    )


def ensure_haproxy() -> str:
    return find_haproxy() or _apt_install("haproxy", ("haproxy",), find_haproxy)


# ---------------------------------------------------------------------------
# Targets
# ---------------------------------------------------------------------------

NGINX_CONF = """\
# generated by benchmarks/run.py
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 65536;
pid {tmpdir}/nginx.pid;
error_log {tmpdir}/nginx-error.log warn;

events {
    worker_connections 32768;
    use epoll;
}

http {
    access_log off;
    client_body_temp_path {tmpdir}/client_body;
    proxy_temp_path {tmpdir}/proxy;
    fastcgi_temp_path {tmpdir}/fastcgi;
    uwsgi_temp_path {tmpdir}/uwsgi;
    scgi_temp_path {tmpdir}/scgi;
    tcp_nodelay on;

    upstream echo_backend {
        server {backend_host}:{backend_port};
    }

    map $http_upgrade $connection_upgrade {
        default upgrade;
        ''      close;
    }

    server {
        listen {listen} backlog=4096;
        location / {
            proxy_pass http://echo_backend;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_buffering off;
            proxy_read_timeout 3600s;
            proxy_send_timeout 3600s;
        }
    }
}
"""

# One process (no master-worker: started with -db and without -W), one thread.
# {maxconn} is filled in by haproxy_maxconn(): HAProxy refuses to start when it
# cannot raise its file descriptor limit to about 2 x maxconn.
# No `log` line anywhere, so nothing is logged (no files that grow); start-up
# alerts go to stderr, i.e. {tmpdir}/proxy.log.  HAProxy switches a connection
# to tunnel mode after the 101 answer, where `timeout tunnel` applies instead of
# client/server.  It sets TCP_NODELAY on its sockets by itself.
HAPROXY_CFG = """\
# generated by benchmarks/run.py
global
    nbthread 1
    maxconn {maxconn}
    pidfile {tmpdir}/haproxy.pid

defaults
    mode http
    maxconn {maxconn}
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 10s
    timeout tunnel 3600s
    timeout client-fin 5s
    timeout server-fin 5s

frontend ws_in
    bind {listen} backlog 4096
    default_backend echo_backend

backend echo_backend
    server echo {backend_host}:{backend_port}
"""


def haproxy_maxconn() -> int:
    """10,000, or less when the hard file descriptor limit is lower (2 fds per proxied connection)."""
    try:
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    except (OSError, ValueError):
        return 10000
    if hard == resource.RLIM_INFINITY:
        return 10000
    return max(100, min(10000, (hard - 100) // 2))


ATLAS_TOML = """\
# generated by benchmarks/run.py
[proxy]
listen = "{listen}"

[admin]
# Metrics on, as by default, but on a free port so that runs side by side do not collide.
listen = "127.0.0.1:0"

[[servers]]
name = "echo"
url = "{backend_url}"
capacity = 100000
"""


@dataclasses.dataclass
class Target:
    """A generic proxy under test.

    ``command`` is an argv template; ``config_template`` (if any) is written to
    ``{tmpdir}/<config_name>``.  Both may use these placeholders, replaced
    literally (so nginx's own braces and $variables are left alone):
    {port} {listen} {backend_url} {backend_host} {backend_port} {tmpdir} {config}.
    ``command=None`` means no proxy: the generator talks to the backend directly.
    CPU and RSS are summed over the started process and all its descendants, or
    over the PID read from ``pidfile`` (a template) if given.
    """

    name: str
    command: list[str] | None
    config_template: str | None = None
    config_name: str = "config"
    cwd: str | None = None
    env: dict[str, str] | None = None
    pidfile: str | None = None
    ready_timeout: float = 20.0
    check: Callable[[], None] | None = None  # raises BenchError when the target cannot run here
    describe: str = ""


def _subst(template: str, values: dict[str, str]) -> str:
    for k, v in values.items():
        template = template.replace("{" + k + "}", v)
    return template


def atlas_check(python: str) -> Callable[[], None]:
    def check() -> None:
        code = "import importlib.util, sys; sys.exit(0 if importlib.util.find_spec('atlas.__main__') else 3)"
        try:
            r = subprocess.run(
                [python, "-c", code],
                cwd=REPO_ROOT,
                env=_atlas_env(),
                timeout=60,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            raise BenchError(f"cannot run {python}: {e}") from e
        if r.returncode != 0:
            detail = r.stdout.strip().splitlines()[-1:] or ["atlas.__main__ not found"]
            raise BenchError(f"`{python} -m atlas` is not runnable yet ({detail[0]})")

    return check


def _atlas_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def builtin_targets(args: argparse.Namespace) -> dict[str, Target]:
    targets = {
        "direct": Target("direct", None, describe="generator -> echo backend, no proxy"),
        "nginx": Target(
            "nginx",
            ["{nginx}", "-p", "{tmpdir}", "-c", "{config}", "-e", "{tmpdir}/nginx-error.log"],
            config_template=NGINX_CONF,
            config_name="nginx.conf",
            describe="nginx, worker_processes 1, WebSocket reverse proxy",
        ),
        "haproxy": Target(
            "haproxy",
            ["{haproxy}", "-db", "-f", "{config}"],
            config_template=HAPROXY_CFG.replace("{maxconn}", str(haproxy_maxconn())),
            config_name="haproxy.cfg",
            describe="HAProxy, one process (-db), nbthread 1, mode http",
        ),
        "atlas": Target(
            "atlas",
            [
                args.atlas_python,
                "-m",
                "atlas",
                "serve",
                "--config",
                "{config}",
                *shlex.split(args.atlas_extra_args),
            ],
            config_template=ATLAS_TOML,
            config_name="atlas.toml",
            cwd=str(REPO_ROOT),
            env=_atlas_env(),
            check=atlas_check(args.atlas_python),
            describe="python -m atlas serve",
        ),
    }
    for spec in args.target_cmd or []:
        name, sep, cmd = spec.partition("=")
        if not sep or not name or not cmd:
            raise BenchError(f"--target-cmd wants NAME=COMMAND, got {spec!r}")
        tmpl = None
        cfg_name = "config"
        for cspec in args.target_config or []:
            cname, _, path = cspec.partition("=")
            if cname == name:
                tmpl = Path(path).read_text()
                cfg_name = Path(path).name
        targets[name] = Target(
            name,
            shlex.split(cmd),
            config_template=tmpl,
            config_name=cfg_name,
            cwd=str(REPO_ROOT),
            describe=cmd,
        )
    return targets


class RunningTarget:
    def __init__(
        self,
        target: Target,
        url: str,
        proc: subprocess.Popen[bytes] | None,
        tmpdir: Path | None,
        values: dict[str, str],
    ):
        self.target = target
        self.url = url
        self.proc = proc
        self.tmpdir = tmpdir
        self.values = values

    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        if self.target.pidfile:
            try:
                pid = int(Path(_subst(self.target.pidfile, self.values)).read_text().split()[0])
                return process_tree(pid)
            except (OSError, ValueError, IndexError):
                return []
        return process_tree(self.proc.pid)

    def stop(self, procs: ProcessSet) -> None:
        if self.proc is not None:
            procs.stop(self.proc)
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


def start_target(
    target: Target, backend_port: int, procs: ProcessSet, binaries: dict[str, str]
) -> RunningTarget:
    backend_url = f"ws://{HOST}:{backend_port}"
    if target.command is None:
        return RunningTarget(target, backend_url, None, None, {})
    if target.check:
        target.check()
    tmpdir = Path(tempfile.mkdtemp(prefix=f"atlas-bench-{target.name}-{os.getpid()}-"))
    port = free_port()
    values = {
        "port": str(port),
        "listen": f"{HOST}:{port}",
        "backend_url": backend_url,
        "backend_host": HOST,
        "backend_port": str(backend_port),
        "tmpdir": str(tmpdir),
        "nginx": "nginx",
        "haproxy": "haproxy",
        **binaries,
    }
    values["config"] = str(tmpdir / target.config_name)
    if target.config_template is not None:
        (tmpdir / target.config_name).write_text(_subst(target.config_template, values))
    argv = [_subst(a, values) for a in target.command]
    log_path = tmpdir / "proxy.log"
    # the child keeps its own copy of the file descriptor; ours is closed on leaving the block
    with open(log_path, "wb") as logf:
        try:
            proc = procs.start(
                target.name, argv, cwd=target.cwd, env=target.env, stdout=logf, stderr=subprocess.STDOUT
            )
        except OSError as e:
            raise BenchError(f"cannot start {target.name}: {e}") from e
    log(f"started {target.name} (pid {proc.pid}) on {HOST}:{port}: {' '.join(argv)}")
    wait_for_port(port, proc, target.ready_timeout, target.name, log_path)
    return RunningTarget(target, f"ws://{HOST}:{port}", proc, tmpdir, values)


# ---------------------------------------------------------------------------
# Echo backend
# ---------------------------------------------------------------------------


def start_backend(node: str, procs: ProcessSet) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = procs.start(
        "echo-backend",
        [node, str(ECHO), "--port", str(port), "--max-lifetime", "3600"],
        stdin=subprocess.PIPE,  # the backend exits when this pipe closes (i.e. when we die)
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=NODE_DIR,
    )
    wait_for_port(port, proc, 15, "echo backend", None)
    log(f"echo backend (pid {proc.pid}) on {HOST}:{port}")
    return proc, port


# ---------------------------------------------------------------------------
# Running the generator with CPU/RSS sampling at its window markers
# ---------------------------------------------------------------------------

SYNC_MARKS = {"idle_before", "idle_after"}


@dataclasses.dataclass
class Snapshot:
    t: float
    cpu: dict[str, int]
    threads: dict[str, dict[int, int]]
    rss: dict[str, int]
    machine: tuple[int, int, int]
    load: list[float]


def take_snapshot(groups: dict[str, list[int]]) -> Snapshot:
    t = time.monotonic()
    cpu = {g: sum(cpu_ticks(p) for p in pids) for g, pids in groups.items()}
    threads = {}
    for g, pids in groups.items():
        d: dict[int, int] = {}
        for p in pids:
            d.update(thread_ticks(p))
        threads[g] = d
    rss = {g: sum(rss_kib(p) for p in pids) for g, pids in groups.items()}
    return Snapshot(t, cpu, threads, rss, machine_cpu(), loadavg())


def window_usage(a: Snapshot, b: Snapshot) -> dict[str, Any]:
    """CPU use between two snapshots, in cores (1.0 = one core busy the whole time)."""
    dt = b.t - a.t
    out: dict[str, Any] = {"wall_s": round(dt, 4)}
    if dt <= 0:
        return out
    accounted = 0.0
    for g in b.cpu:
        secs = (b.cpu[g] - a.cpu.get(g, 0)) / CLK_TCK
        accounted += secs
        busiest = 0.0
        for tid, ticks in b.threads[g].items():
            busiest = max(busiest, (ticks - a.threads.get(g, {}).get(tid, 0)) / CLK_TCK / dt)
        out[g] = {
            "cpu_s": round(secs, 3),
            "cores": round(secs / dt, 3),
            "busiest_thread_cores": round(busiest, 3),
        }
    tot = b.machine[0] - a.machine[0]
    idle = b.machine[1] - a.machine[1]
    irq = b.machine[2] - a.machine[2]
    busy_cores = (tot - idle) / tot * NCPU if tot > 0 else 0.0
    irq_cores = irq / tot * NCPU if tot > 0 else 0.0
    out["machine_busy_cores"] = round(busy_cores, 3)
    # Interrupt/softirq time (mostly loopback TCP processing).  With tick-based CPU
    # accounting (no CONFIG_IRQ_TIME_ACCOUNTING) softirq work done in a process's
    # context is part of that process's utime+stime, so it is shown for information
    # only and not subtracted: busy time beyond our processes is other work.
    out["irq_softirq_cores"] = round(irq_cores, 3)
    out["other_processes_cores"] = round(max(0.0, busy_cores - accounted / dt), 3)
    out["loadavg"] = b.load
    return out


def run_generator(
    node: str,
    scenario: str,
    url: str,
    gen_args: list[str],
    *,
    groups_fn: Callable[[], dict[str, list[int]]],
    procs: ProcessSet,
    limit_s: float,
) -> tuple[dict[str, Any], dict[str, Snapshot], list[str]]:
    argv = [node, str(LOADGEN), scenario, "--url", url, "--sync", *gen_args]
    proc = procs.start(
        f"loadgen-{scenario}",
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=NODE_DIR,
    )
    marks: dict[str, Snapshot] = {}
    diag: list[str] = []

    def groups() -> dict[str, list[int]]:
        g = groups_fn()
        g["generator"] = [proc.pid]
        return g

    def read_stderr() -> None:
        assert proc.stderr is not None
        for raw in proc.stderr:
            line = raw.decode("utf-8", "replace").rstrip("\n")
            if line.startswith("@@mark "):
                name = line.split()[1]
                marks[name] = take_snapshot(groups())
                if name in SYNC_MARKS and proc.stdin is not None:
                    try:
                        proc.stdin.write(b"ok\n")
                        proc.stdin.flush()
                    except OSError:
                        pass
            else:
                diag.append(line)
                if len(diag) > 200:
                    del diag[:100]

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    killer = threading.Timer(limit_s, lambda: _kill_group(proc))
    killer.daemon = True
    killer.start()
    try:
        assert proc.stdout is not None
        out = proc.stdout.read().decode("utf-8", "replace")
        proc.wait(10)
        reader.join(5)
    finally:
        killer.cancel()
        procs.stop(proc)
    lines = [ln for ln in out.splitlines() if ln.strip().startswith("{")]
    if not lines:
        raise BenchError(
            f"load generator ({scenario}) printed no result (exit {proc.returncode}); stderr:\n  "
            + "\n  ".join(diag[-15:])
        )
    result = json.loads(lines[-1])
    return result, marks, diag


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------


@dataclasses.dataclass
class Plan:
    warmup: float
    duration: float
    tick_duration: float
    conns: int
    inflight: int
    size: int
    tick_conns: int
    tick_rate: float
    handshakes: int
    hs_concurrency: int
    idle: int
    threads: int


def scenario_runs(plan: Plan, scenarios: list[str]) -> list[tuple[str, str, list[str], float]]:
    """(key, loadgen scenario, loadgen args, time limit)"""
    runs = []
    common = ["--threads", str(plan.threads)]
    if "throughput" in scenarios:
        for mode in ("binary", "text"):
            runs.append(
                (
                    f"throughput_{mode}",
                    "throughput",
                    [
                        *common,
                        "--mode",
                        mode,
                        "--conns",
                        str(plan.conns),
                        "--inflight",
                        str(plan.inflight),
                        "--size",
                        str(plan.size),
                        "--warmup",
                        str(plan.warmup),
                        "--duration",
                        str(plan.duration),
                    ],
                    plan.warmup + plan.duration + 90,
                )
            )
    if "tick" in scenarios:
        runs.append(
            (
                "tick",
                "tick",
                [
                    *common,
                    "--conns",
                    str(plan.tick_conns),
                    "--rate",
                    str(plan.tick_rate),
                    "--warmup",
                    str(plan.warmup),
                    "--duration",
                    str(plan.tick_duration),
                ],
                plan.warmup + plan.tick_duration + 90,
            )
        )
    if "connections" in scenarios:
        runs.append(
            (
                "connections",
                "connections",
                [
                    *common,
                    "--handshakes",
                    str(plan.handshakes),
                    "--concurrency",
                    str(plan.hs_concurrency),
                    "--idle",
                    str(plan.idle),
                ],
                240,
            )
        )
    return runs


def derive(key: str, res: dict[str, Any], marks: dict[str, Snapshot], has_proxy: bool) -> dict[str, Any]:
    """Numbers computed by the driver from the /proc samples at the generator's markers."""
    d: dict[str, Any] = {}
    if key.startswith("throughput") or key == "tick":
        if "window_start" in marks and "window_end" in marks:
            u = window_usage(marks["window_start"], marks["window_end"])
            d["usage"] = u
            echoes = res.get("echoes", 0)
            if has_proxy:
                d["proxy_cores"] = u["proxy"]["cores"]
            if has_proxy and echoes:
                # each echo is relayed twice by the proxy: client->backend and backend->client
                d["proxy_cpu_us_per_msg"] = u["proxy"]["cpu_s"] * 1e6 / (2 * echoes)
            if echoes:
                d["backend_cpu_us_per_msg"] = u["backend"]["cpu_s"] * 1e6 / (2 * echoes)
    elif key == "connections":
        if "hs_start" in marks and "hs_end" in marks:
            u = window_usage(marks["hs_start"], marks["hs_end"])
            d["usage"] = u
            ok = res.get("handshakes_ok", 0)
            if has_proxy and ok:
                d["proxy_cpu_us_per_handshake"] = u["proxy"]["cpu_s"] * 1e6 / ok
        if "idle_before" in marks and "idle_after" in marks:
            a, b = marks["idle_before"], marks["idle_after"]
            n = res.get("idle_opened", 0)
            d["rss_kib"] = {"before": a.rss, "after": b.rss}
            if n:
                if has_proxy:
                    d["proxy_rss_kib_per_idle_conn"] = (b.rss["proxy"] - a.rss["proxy"]) / n
                d["backend_rss_kib_per_idle_conn"] = (b.rss["backend"] - a.rss["backend"]) / n
        if "idle_after" in marks and "idle_end" in marks:
            d["idle_usage"] = window_usage(marks["idle_after"], marks["idle_end"])
    return d


def warnings_for(target: str, key: str, res: dict[str, Any], der: dict[str, Any], threads: int) -> list[str]:
    w = []
    where = f"{target}/{key}"
    u = der.get("usage") or {}
    gen = u.get("generator")
    if gen and gen["busiest_thread_cores"] > SATURATED:
        w.append(
            f"{where}: generator busiest thread at {gen['busiest_thread_cores']:.0%} of a core "
            f"(total {gen['cores']:.2f} cores, {threads} worker thread(s)): the generator is the bottleneck"
        )
    be = u.get("backend")
    if be and be["busiest_thread_cores"] > SATURATED:
        w.append(
            f"{where}: echo backend at {be['busiest_thread_cores']:.0%} of a core: "
            "the backend is a bottleneck"
        )
    if u.get("other_processes_cores", 0) > 0.15:
        w.append(
            f"{where}: processes outside the benchmark used {u['other_processes_cores']:.2f} cores "
            "during the window"
        )
    if u.get("loadavg") and u["loadavg"][0] > 2 * NCPU:
        w.append(f"{where}: load average {u['loadavg'][0]:.1f} on {NCPU} cores")
    for k in (
        "connect_errors",
        "mismatches",
        "unanswered",
        "unexpected_closes",
        "handshake_errors",
        "idle_errors",
        "idle_unexpected_closes",
    ):
        if res.get(k):
            w.append(f"{where}: {k} = {res[k]}")
    if res.get("error"):
        w.append(f"{where}: generator error: {res['error'].splitlines()[0]}")
    if key == "tick" and res.get("achieved_ratio") is not None and res["achieved_ratio"] < 0.99:
        w.append(f"{where}: achieved only {res['achieved_ratio']:.1%} of the offered rate")
    if key == "tick" and (res.get("send_lag_ms") or {}).get("p99", 0) > 10:
        w.append(
            f"{where}: generator sent late (p99 send lag {res['send_lag_ms']['p99']} ms): "
            "latency understates load"
        )
    return w


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------

# (label, getter, format, ratio-to-nginx meaningful)
Metric = tuple[str, Callable[[dict[str, Any]], Any], str, bool]


def _get(path: str) -> Callable[[dict[str, Any]], Any]:
    def g(s: dict[str, Any]) -> Any:
        cur: Any = s
        for p in path.split("."):
            if not isinstance(cur, dict) or p not in cur:
                return None
            cur = cur[p]
        return cur

    return g


METRICS: list[tuple[str, list[Metric]]] = [
    (
        "throughput_binary",
        [
            ("echoes/s", _get("result.echoes_per_s"), "{:,.0f}", True),
            ("proxy CPU µs/msg", _get("derived.proxy_cpu_us_per_msg"), "{:.2f}", True),
            ("latency p50 ms", _get("result.latency_ms.p50"), "{:.2f}", True),
        ],
    ),
    (
        "throughput_text",
        [
            ("echoes/s", _get("result.echoes_per_s"), "{:,.0f}", True),
            ("proxy CPU µs/msg", _get("derived.proxy_cpu_us_per_msg"), "{:.2f}", True),
            ("latency p50 ms", _get("result.latency_ms.p50"), "{:.2f}", True),
        ],
    ),
    (
        "tick",
        [
            ("RTT p50 ms", _get("result.latency_ms.p50"), "{:.3f}", True),
            ("RTT p90 ms", _get("result.latency_ms.p90"), "{:.3f}", True),
            ("RTT p99 ms", _get("result.latency_ms.p99"), "{:.3f}", True),
            ("RTT max ms", _get("result.latency_ms.max"), "{:.2f}", True),
            ("achieved/offered", _get("result.achieved_ratio"), "{:.2%}", False),
            ("proxy CPU µs/msg", _get("derived.proxy_cpu_us_per_msg"), "{:.2f}", True),
            ("proxy CPU % of a core", lambda s: _pct(_get("derived.proxy_cores")(s)), "{:.1f}%", True),
        ],
    ),
    (
        "connections",
        [
            ("handshakes/s", _get("result.handshakes_per_s"), "{:,.0f}", True),
            ("handshake p99 ms", _get("result.handshake_latency_ms.p99"), "{:.1f}", True),
            ("proxy CPU µs/handshake", _get("derived.proxy_cpu_us_per_handshake"), "{:.0f}", True),
            ("proxy RSS KiB/idle conn", _get("derived.proxy_rss_kib_per_idle_conn"), "{:.1f}", True),
        ],
    ),
]


def _pct(x: Any) -> Any:
    return None if x is None else x * 100


def _fmt(v: Any, fmt: str) -> str:
    if v is None:
        return "\u2013"  # en dash
    try:
        return fmt.format(v)
    except (ValueError, TypeError):
        return str(v)


def render_table(report: dict[str, Any]) -> str:
    targets = [t for t in report["targets"]]
    lines = []
    hdr = ["scenario", "metric", *targets]
    lines.append("| " + " | ".join(hdr) + " |")
    lines.append("|" + "---|" * 2 + "---:|" * len(targets))
    for key, metrics in METRICS:
        if not any(key in report["targets"][t].get("scenarios", {}) for t in targets):
            continue
        for i, (label, getter, fmt, ratio_ok) in enumerate(metrics):
            row = [key if i == 0 else "", label]
            ref = None
            if "nginx" in report["targets"]:
                s = report["targets"]["nginx"].get("scenarios", {}).get(key)
                ref = getter(s) if s else None
            for t in targets:
                s = report["targets"][t].get("scenarios", {}).get(key)
                v = getter(s) if s else None
                cell = _fmt(v, fmt)
                if ratio_ok and t != "nginx" and v is not None and ref:
                    cell += f" ({v / ref:.2f}{TIMES})"
                row.append(cell)
            lines.append("| " + " | ".join(row) + " |")
    out = "\n".join(lines)

    # resource use during each measured window
    rl = [
        "",
        "CPU use during each measured window, in cores (1.00 = one core fully busy; "
        f"the machine has {NCPU}):",
        "",
        "| target | scenario | proxy | backend | generator (busiest thread) | machine busy "
        "| (of which softirq) | other work |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for t in targets:
        for key, s in report["targets"][t].get("scenarios", {}).items():
            u = (s.get("derived") or {}).get("usage") or {}
            if not u:
                continue
            px = u.get("proxy", {}).get("cores") if report["targets"][t].get("has_proxy") else None
            gen = u.get("generator", {})
            gen_cell = f"{gen.get('cores', 0):.2f} ({gen.get('busiest_thread_cores', 0):.2f})"
            if gen.get("busiest_thread_cores", 0) > SATURATED:
                gen_cell += " ⚠"
            be = u.get("backend", {}).get("cores")
            be_cell = _fmt(be, "{:.2f}") + (
                " ⚠" if u.get("backend", {}).get("busiest_thread_cores", 0) > SATURATED else ""
            )
            other_flag = " \u26a0" if u.get("other_processes_cores", 0) > 0.15 else ""
            rl.append(
                f"| {t} | {key} | {_fmt(px, '{:.2f}')} | {be_cell} | {gen_cell} | "
                f"{u.get('machine_busy_cores', 0):.2f} | {u.get('irq_softirq_cores', 0):.2f} | "
                f"{u.get('other_processes_cores', 0):.2f}{other_flag} |"
            )
    if len(rl) > 5:
        out += "\n" + "\n".join(rl)
    failed = [(t, v["error"]) for t, v in report["targets"].items() if v.get("error")]
    if failed:
        out += "\n\nTargets that did not run:\n" + "\n".join(
            f"- {t}: {e.splitlines()[0]}"
            + (f" … {e.strip().splitlines()[-1].strip()}" if len(e.strip().splitlines()) > 1 else "")
            for t, e in failed
        )
    if report["warnings"]:
        out += "\n\nWarnings:\n" + "\n".join(f"- {w}" for w in report["warnings"])
    return out


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def machine_info(node: str, nginx: str | None, haproxy: str | None) -> dict[str, Any]:
    def cmd_out(argv: list[str]) -> str | None:
        try:
            r = subprocess.run(
                argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=10, check=False
            )
            return r.stdout.strip().splitlines()[0] if r.stdout.strip() else None
        except (OSError, subprocess.TimeoutExpired):
            return None

    model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpus": NCPU,
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": cmd_out([node, "--version"]),
        "nginx": cmd_out([nginx, "-v"]) if nginx else None,
        "haproxy": cmd_out([haproxy, "-v"]) if haproxy else None,
        "git_commit": cmd_out(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"]),
        "loadavg_at_start": loadavg(),
        "clk_tck": CLK_TCK,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--targets",
        default="direct,nginx,haproxy,atlas",
        help="comma-separated: direct, nginx, haproxy, atlas, or names from --target-cmd "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--scenarios", default=",".join(ALL_SCENARIOS), help="comma-separated subset of %(default)s"
    )
    p.add_argument(
        "--duration",
        type=float,
        default=None,
        help="throughput measuring window, s (default 5; 2 with --quick)",
    )
    p.add_argument(
        "--tick-duration",
        type=float,
        default=None,
        help="tick measuring window, s (default 10; 3 with --quick)",
    )
    p.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="warm-up before each window, s (default 1; 0.5 with --quick)",
    )
    p.add_argument("--quick", action="store_true", help="short smoke run (short windows, fewer handshakes)")
    p.add_argument("--conns", type=int, default=100, help="throughput: connections (default %(default)s)")
    p.add_argument(
        "--inflight",
        type=int,
        default=10,
        help="throughput: messages in flight per connection (default %(default)s)",
    )
    p.add_argument(
        "--size", type=int, default=64, help="throughput: message size in bytes (default %(default)s)"
    )
    p.add_argument("--tick-conns", type=int, default=1000, help="tick: connections (default %(default)s)")
    p.add_argument(
        "--tick-rate", type=float, default=20, help="tick: messages/s per connection (default %(default)s)"
    )
    p.add_argument(
        "--handshakes",
        type=int,
        default=None,
        help="connections: handshakes (default 5000; 1000 with --quick)",
    )
    p.add_argument(
        "--hs-concurrency",
        type=int,
        default=100,
        help="connections: handshakes at once (default %(default)s)",
    )
    p.add_argument(
        "--idle",
        type=int,
        default=None,
        help="connections: idle connections held (default 2000; 500 with --quick)",
    )
    p.add_argument(
        "--threads", type=int, default=1, help="load generator worker threads (default %(default)s)"
    )
    p.add_argument(
        "--atlas-python", default=sys.executable, help="python used for `-m atlas` (default: this one)"
    )
    p.add_argument(
        "--atlas-extra-args",
        default="",
        metavar="ARGS",
        help="extra arguments for `atlas serve`, e.g. '--log-level warning' (default: none)",
    )
    p.add_argument(
        "--target-cmd",
        action="append",
        metavar="NAME=COMMAND",
        help="extra target: COMMAND may use {port} {listen} {backend_url} {backend_host} "
        "{backend_port} {tmpdir} {config}",
    )
    p.add_argument(
        "--target-config",
        action="append",
        metavar="NAME=TEMPLATE_FILE",
        help="config template for a --target-cmd target, written to {tmpdir} and passed as {config}",
    )
    p.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="S",
        help="before each scenario wait up to S seconds for other work on the machine to stop "
        "(busy < 0.25 cores); default 0 = do not wait",
    )
    p.add_argument(
        "--results-dir", default=str(RESULTS_DIR), help="where the JSON goes (default: benchmarks/results)"
    )
    p.add_argument(
        "--no-install",
        action="store_true",
        help="do not run npm/apt-get; a missing nginx or node fails the run, a missing haproxy skips it",
    )
    a = p.parse_args(argv)
    q = a.quick
    a.duration = a.duration if a.duration is not None else (2.0 if q else 5.0)
    a.tick_duration = a.tick_duration if a.tick_duration is not None else (3.0 if q else 10.0)
    a.warmup = a.warmup if a.warmup is not None else (0.5 if q else 1.0)
    a.handshakes = a.handshakes if a.handshakes is not None else (1000 if q else 5000)
    a.idle = a.idle if a.idle is not None else (500 if q else 2000)
    for name, v, hi in (
        ("--duration", a.duration, 120),
        ("--tick-duration", a.tick_duration, 120),
        ("--warmup", a.warmup, 30),
    ):
        if not 0 < v <= hi:
            p.error(f"{name} must be in (0, {hi}]")
    for name, v, hi in (
        ("--conns", a.conns, 5000),
        ("--tick-conns", a.tick_conns, 5000),
        ("--handshakes", a.handshakes, 50000),
        ("--idle", a.idle, 8000),
        ("--inflight", a.inflight, 1000),
        ("--threads", a.threads, 8),
        ("--hs-concurrency", a.hs_concurrency, 1000),
        ("--size", a.size, 1 << 20),
    ):
        if not 0 < v <= hi:
            p.error(f"{name} must be in [1, {hi}]")
    if not 0 < a.tick_rate <= 1000:
        p.error("--tick-rate must be in (0, 1000]")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in scenarios if s not in ALL_SCENARIOS]
    if bad:
        print(f"unknown scenario(s): {', '.join(bad)}", file=sys.stderr)
        return 2
    target_names = [t.strip() for t in args.targets.split(",") if t.strip()]

    def _term(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _term)
    signal.signal(signal.SIGHUP, _term)

    procs = ProcessSet()
    try:
        targets = builtin_targets(args)
        unknown = [t for t in target_names if t not in targets]
        if unknown:
            print(f"unknown target(s): {', '.join(unknown)} (known: {', '.join(targets)})", file=sys.stderr)
            return 2
        if args.no_install:
            node = shutil.which("node") or ""
            if not node or not (NODE_DIR / "node_modules" / "ws").exists():
                raise BenchError("node or benchmarks/node/node_modules missing (and --no-install given)")
        else:
            node = ensure_node_deps()
        binaries: dict[str, str] = {}
        if "nginx" in target_names:
            nginx_path = find_nginx() if args.no_install else ensure_nginx()
            if not nginx_path:
                raise BenchError("nginx is not installed (and --no-install given)")
            binaries["nginx"] = nginx_path
        # nginx is the reference for the ratios, so a missing nginx ends the run; a
        # missing haproxy only skips that target (reported like an unrunnable atlas).
        unavailable: dict[str, str] = {}
        if "haproxy" in target_names:
            try:
                haproxy_path = find_haproxy() if args.no_install else ensure_haproxy()
                if not haproxy_path:
                    raise BenchError("haproxy is not installed (and --no-install given)")
                binaries["haproxy"] = haproxy_path
            except (BenchError, OSError, subprocess.TimeoutExpired) as e:
                unavailable["haproxy"] = str(e)
                log(f"haproxy: {e}")
        plan = Plan(
            warmup=args.warmup,
            duration=args.duration,
            tick_duration=args.tick_duration,
            conns=args.conns,
            inflight=args.inflight,
            size=args.size,
            tick_conns=args.tick_conns,
            tick_rate=args.tick_rate,
            handshakes=args.handshakes,
            hs_concurrency=args.hs_concurrency,
            idle=args.idle,
            threads=args.threads,
        )
        runs = scenario_runs(plan, scenarios)
        info = machine_info(
            node, binaries.get("nginx") or find_nginx(), binaries.get("haproxy") or find_haproxy()
        )
        report: dict[str, Any] = {
            "timestamp": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": info,
            "plan": dataclasses.asdict(plan),
            "scenarios": scenarios,
            "targets": {},
            "warnings": [],
        }
        info["busy_cores_at_start"] = round(machine_busy_cores(0.5), 3)
        if info["busy_cores_at_start"] > 0.25 or info["loadavg_at_start"][0] > NCPU:
            report["warnings"].append(
                "the machine was busy before the run started "
                f"({info['busy_cores_at_start']:.2f} cores in use, "
                f"load average {info['loadavg_at_start'][0]:.2f} on {NCPU} cores): "
                "other work skews every number"
            )
        log(
            f"machine: {NCPU} cpus, load average {info['loadavg_at_start']}, "
            f"{info['busy_cores_at_start']:.2f} cores busy"
        )

        backend, backend_port = start_backend(node, procs)
        t_run0 = time.monotonic()
        for tname in target_names:
            target = targets[tname]
            entry: dict[str, Any] = {
                "describe": target.describe,
                "has_proxy": target.command is not None,
                "scenarios": {},
            }
            report["targets"][tname] = entry
            try:
                if tname in unavailable:
                    raise BenchError(unavailable[tname])
                for key, scen, gen_args, limit in runs:
                    if backend.poll() is not None:
                        raise BenchError("the echo backend died")
                    if args.wait_quiet > 0:
                        wait_for_quiet(args.wait_quiet)
                    # A freshly started proxy for every scenario: no scenario inherits
                    # another's heap growth, leaked connections or slowdowns.
                    running = start_target(target, backend_port, procs, binaries)
                    try:
                        entry["url"] = running.url
                        probe, _, _ = run_generator(
                            node, "probe", running.url, [], groups_fn=dict, procs=procs, limit_s=20
                        )
                        if not probe.get("ok"):
                            raise BenchError(
                                f"{tname} does not echo correctly through {running.url}: "
                                f"{probe.get('error')} {probe.get('checks')}"
                            )
                        log(f"{tname}: {key} ...")

                        def groups(rt: RunningTarget = running) -> dict[str, list[int]]:
                            return {"proxy": rt.pids(), "backend": [backend.pid]}

                        res, marks, _ = run_generator(
                            node, scen, running.url, gen_args, groups_fn=groups, procs=procs, limit_s=limit
                        )
                        if running.proc is not None and running.proc.poll() is not None:
                            res.setdefault(
                                "error", f"{tname} exited with code {running.proc.returncode} during the run"
                            )
                        der = derive(key, res, marks, running.proc is not None)
                        entry["scenarios"][key] = {"result": res, "derived": der}
                        if running.tmpdir is not None:
                            entry["scenarios"][key]["proxy_log_tail"] = _tail(
                                running.tmpdir / "proxy.log", 5
                            ).strip()
                        report["warnings"].extend(warnings_for(tname, key, res, der, args.threads))
                        log(f"{tname}: {key}: {_one_line(key, res, der)}")
                    finally:
                        running.stop(procs)
            except BenchError as e:
                entry["error"] = str(e)
                log(f"{tname}: skipped: {e}")
        report["elapsed_s"] = round(time.monotonic() - t_run0, 1)

        table = render_table(report)
        RESULTS_DIR_ = Path(args.results_dir)
        RESULTS_DIR_.mkdir(parents=True, exist_ok=True)
        out_path = RESULTS_DIR_ / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
        report["table_markdown"] = table
        out_path.write_text(json.dumps(report, indent=2, default=_json_default) + "\n")
        print(table)
        print(f"\nresults: {out_path}  ({report['elapsed_s']} s)")
        return 0 if all(not v.get("error") for v in report["targets"].values()) else 1
    except BenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        procs.stop_all()
        for d in Path(tempfile.gettempdir()).glob(f"atlas-bench-*-{os.getpid()}-*"):
            shutil.rmtree(d, ignore_errors=True)


def _json_default(o: Any) -> Any:
    if dataclasses.is_dataclass(o) and not isinstance(o, type):
        return dataclasses.asdict(o)
    return str(o)


def _one_line(key: str, res: dict[str, Any], der: dict[str, Any]) -> str:
    if res.get("error"):
        return f"ERROR {res['error'].splitlines()[0]}"
    if key.startswith("throughput"):
        s = f"{res.get('echoes_per_s', 0):,.0f} echoes/s"
    elif key == "tick":
        lat = res.get("latency_ms", {})
        s = f"p50 {lat.get('p50')} ms p99 {lat.get('p99')} ms, {res.get('achieved_ratio', 0):.1%} of offered"
    else:
        s = f"{res.get('handshakes_per_s', 0):,.0f} handshakes/s"
        if der.get("proxy_rss_kib_per_idle_conn") is not None:
            s += f", {der['proxy_rss_kib_per_idle_conn']:.1f} KiB/idle conn"
    if der.get("proxy_cpu_us_per_msg") is not None:
        s += f", proxy {der['proxy_cpu_us_per_msg']:.2f} µs/msg"
    gen = (der.get("usage") or {}).get("generator")
    if gen:
        s += f", generator {gen['busiest_thread_cores']:.0%}"
    return s


if __name__ == "__main__":
    sys.exit(main())

"""Atlas's configuration: frozen records, read from and written to TOML.

Design:

- The records (`Config` and its tables) are frozen attrs classes whose validators hold every
  invariant, so a value built in code is as checked as one read from a file. They know nothing
  about TOML.
- One private cattrs converter (``_converter``) turns the dict from stdlib `tomllib` into those
  records and back (tomli-w writes). Its hooks are strict: no ``"5"`` for an integer, no
  ``"false"`` for a boolean, no string where an array belongs; unknown keys are rejected.
- Each field is structured *and validated* on its own, so cattrs' detailed validation collects
  every problem of a file in one pass. The exception tree is then flattened into ``path: reason``
  lines (``servers[2].url: not a ws:// or wss:// URL``) raised as one `atlas.errors.ConfigError`:
  no traceback reaches the user.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Iterable
from datetime import date, datetime, time
from typing import Any, Literal, get_args, get_origin

import attrs
import cattrs
import cattrs.gen
import tomli_w
from cattrs.errors import (
    ClassValidationError,
    ForbiddenExtraKeysError,
    IterableValidationError,
    IterableValidationNote,
)
from cattrs.preconf.tomllib import make_converter

from atlas.errors import ConfigError

__all__ = [
    "AdminConfig",
    "Algorithm",
    "AnalyzerConfig",
    "AuthConfig",
    "BalancerConfig",
    "CellConfig",
    "Config",
    "FailoverConfig",
    "HealthConfig",
    "ListenAddress",
    "LogFormat",
    "LogLevel",
    "LoggingConfig",
    "OutlierConfig",
    "PredictorConfig",
    "ProbeKind",
    "ProxyConfig",
    "RegionConfig",
    "ServerConfig",
    "SkimConfig",
    "SkimDirection",
    "SpawnRule",
    "TlsVersion",
    "TransferConfig",
    "WorldConfig",
    "WsUrl",
    "parse_ws_url",
    "write_default_config",
]

Algorithm = Literal["least_connections", "round_robin", "random", "weighted_round_robin", "power_of_two"]
"""The load-balancing algorithms `BalancerConfig.algorithm` accepts."""

LogLevel = Literal["debug", "info", "warning", "error"]
"""The log levels `LoggingConfig.level` accepts."""

LogFormat = Literal["text", "json"]
"""The log formats `LoggingConfig.format` accepts."""

TlsVersion = Literal["1.2", "1.3"]
"""The TLS versions `ProxyConfig.tls_min_version` accepts."""


# ------------------------------------------------------------------------------------------------
# Addresses and URLs
# ------------------------------------------------------------------------------------------------

_HOSTNAME_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME = re.compile(rf"{_HOSTNAME_LABEL}(?:\.{_HOSTNAME_LABEL})*")
_MAX_PORT = 65535


def _check_host(host: str) -> None:
    """Raise `ValueError` unless *host* is an IPv4 or IPv6 address or a DNS name (no brackets)."""
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv6 address {host!r}") from None
        return
    if len(host) > 253 or not _HOSTNAME.fullmatch(host):
        raise ValueError(f"invalid host {host!r}")
    if host.replace(".", "").isdigit():
        # All-numeric names are IPv4 addresses, and must be valid ones ("999.1.1.1" is not).
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"invalid IPv4 address {host!r}") from None


def _split_host_port(text: str) -> tuple[str, str | None] | None:
    """Split ``host``, ``host:port``, ``[v6]`` or ``[v6]:port`` into host and port text.

    The port is None when absent. Returns None when the shape is wrong (an unbracketed IPv6
    address, text after a closing bracket that is not ``:port``).
    """
    if text.startswith("["):
        end = text.find("]")
        if end == -1:
            return None
        host, rest = text[1:end], text[end + 1 :]
        if not rest:
            return host, None
        if not rest.startswith(":"):
            return None
        return host, rest[1:]
    host, colon, port = text.rpartition(":")
    if not colon:
        return text, None
    if ":" in host:
        return None
    return host, port


def _parse_port(text: str, *, minimum: int) -> int:
    """Parse a decimal port in ``minimum..65535``; raise `ValueError` with a reason otherwise."""
    if not (text.isascii() and text.isdigit()):
        raise ValueError(f"port must be a number, got {text!r}")
    port = int(text)
    if not minimum <= port <= _MAX_PORT:
        raise ValueError(f"port must be {minimum}..{_MAX_PORT}, got {port}")
    return port


def _validate_url_port(_instance: object, _attribute: attrs.Attribute[int], port: int) -> None:
    if not 1 <= port <= _MAX_PORT:
        raise ValueError(f"port must be 1..{_MAX_PORT}, got {port}")


def _validate_resource(_instance: object, _attribute: attrs.Attribute[str], resource: str) -> None:
    if not resource.startswith("/"):
        raise ValueError(f"resource must start with '/', got {resource!r}")


def _format_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _validate_host(_instance: object, _attribute: attrs.Attribute[str], host: str) -> None:
    _check_host(host)


def _validate_listen_port(_instance: object, _attribute: attrs.Attribute[int], port: int) -> None:
    if not 0 <= port <= _MAX_PORT:
        raise ValueError(f"port must be 0..{_MAX_PORT}, got {port}")


@attrs.frozen
class ListenAddress:
    """An address to listen on: a host (name, IPv4 or IPv6 address) and a TCP port.

    Port 0 asks the OS for a free port. ``0.0.0.0`` and ``::`` mean every interface.
    """

    host: str = attrs.field(validator=_validate_host)
    """Host name or address; an IPv6 address is stored without brackets (``::1``)."""
    port: int = attrs.field(validator=_validate_listen_port)
    """TCP port, 0..65535."""

    @classmethod
    def parse(cls, text: str) -> ListenAddress:
        """Parse ``host:port`` (``[v6]:port`` for IPv6), like ``0.0.0.0:9000`` or ``[::1]:9000``.

        Raises `ValueError` whose message is a readable reason, such as
        ``expected host:port, got '9000'``.
        """
        parts = _split_host_port(text)
        if parts is None and text.count(":") > 1 and not text.startswith("["):
            raise ValueError(f"expected host:port, got {text!r} (write IPv6 as [addr]:port)")
        host, port_text = parts or ("", None)
        if not host or port_text is None:
            raise ValueError(f"expected host:port, got {text!r}")
        port = _parse_port(port_text, minimum=0)
        _check_host(host)
        return cls(host, port)

    def __str__(self) -> str:
        return _format_host_port(self.host, self.port)


_DEFAULT_PORTS = {False: 80, True: 443}


@attrs.frozen
class WsUrl:
    """A parsed ``ws://`` or ``wss://`` URL: what is needed to open a WebSocket to a backend.

    ``ws://127.0.0.1:8080`` parses to
    ``WsUrl(secure=False, host="127.0.0.1", port=8080, resource="/")``.
    """

    secure: bool
    """True for ``wss://`` (TLS), False for ``ws://``."""
    host: str = attrs.field(validator=_validate_host)
    """Host name or address; an IPv6 address is stored without brackets."""
    port: int = attrs.field(validator=_validate_url_port)
    """TCP port; 80 for ``ws://`` and 443 for ``wss://`` when the URL has none."""
    resource: str = attrs.field(validator=_validate_resource)
    """Path plus ``?query``, at least ``/`` (RFC 6455 "resource name", as in trio-websocket)."""

    @classmethod
    def parse(cls, url: str) -> WsUrl:
        """Parse a WebSocket URL; raise `ValueError` with a readable reason if it is not one.

        Rules: the scheme is ``ws`` or ``wss`` (any case), a host is required, the port is optional
        (1..65535), user info and fragments are refused (RFC 6455 3), the path and query are kept as
        written.
        """
        scheme, sep, rest = url.partition("://")
        if not sep or scheme.lower() not in ("ws", "wss"):
            raise ValueError("not a ws:// or wss:// URL")
        if any(ch.isspace() or not ch.isprintable() for ch in url):
            raise ValueError("must not contain spaces or control characters")
        if "#" in rest:
            raise ValueError("must not contain a fragment (#...)")
        secure = scheme.lower() == "wss"
        ends = [i for i in (rest.find("/"), rest.find("?")) if i != -1]
        netloc_end = min(ends, default=len(rest))
        netloc, resource = rest[:netloc_end], rest[netloc_end:]
        if "@" in netloc:
            raise ValueError("must not contain user info (user@host)")
        parts = _split_host_port(netloc)
        if parts is None:
            raise ValueError(f"invalid host and port {netloc!r} (write IPv6 as [addr])")
        host, port_text = parts
        if not host:
            raise ValueError("missing host")
        _check_host(host)
        port = _DEFAULT_PORTS[secure] if port_text is None else _parse_port(port_text, minimum=1)
        if not resource.startswith("/"):
            resource = "/" + resource
        return cls(secure, host, port, resource)

    @property
    def scheme(self) -> str:
        """``wss`` or ``ws``."""
        return "wss" if self.secure else "ws"

    @property
    def host_header(self) -> str:
        """The ``Host`` header: host (bracketed if IPv6), plus ``:port`` unless the default."""
        if self.port == _DEFAULT_PORTS[self.secure]:
            return f"[{self.host}]" if ":" in self.host else self.host
        return _format_host_port(self.host, self.port)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.resource}"


def parse_ws_url(url: str) -> WsUrl:
    """Parse a ``ws://`` or ``wss://`` URL; see `WsUrl.parse`. Raises `ValueError` with a reason."""
    return WsUrl.parse(url)


# ------------------------------------------------------------------------------------------------
# Validators. They check one field and never read the instance: the converter runs them per field
# while structuring (instance None), so a file's mistakes are reported together.
# ------------------------------------------------------------------------------------------------


class _ElementErrors(ValueError):
    """Problems found inside a collection field, each at a sub-path such as ``[1].name``."""

    def __init__(self, field: str, problems: list[tuple[str, str]]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(f"{field}{sub}: {reason}" for sub, reason in self.problems))


def _at_least(minimum: int) -> Callable[[object, attrs.Attribute[int], int], None]:
    def validate(_instance: object, _attribute: attrs.Attribute[int], value: int) -> None:
        if value < minimum:
            raise ValueError(f"must be >= {minimum}, got {value}")

    return validate


def _seconds(*, allow_zero: bool) -> Callable[[object, attrs.Attribute[float], float], None]:
    def validate(_instance: object, _attribute: attrs.Attribute[float], value: float) -> None:
        if not math.isfinite(value):
            raise ValueError(f"must be a finite number of seconds, got {value}")
        if allow_zero and value < 0:
            raise ValueError(f"must be >= 0, got {value}")
        if not allow_zero and value <= 0:
            raise ValueError(f"must be > 0, got {value}")

    return validate


def _one_of(literal: Any) -> Callable[[object, attrs.Attribute[str], str], None]:
    choices: tuple[str, ...] = get_args(literal)

    def validate(_instance: object, _attribute: attrs.Attribute[str], value: str) -> None:
        if value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")

    return validate


def _validate_listen(_instance: object, _attribute: attrs.Attribute[str], value: str) -> None:
    ListenAddress.parse(value)


def _validate_url(_instance: object, _attribute: attrs.Attribute[str], value: str) -> None:
    WsUrl.parse(value)


def _validate_optional_url(_instance: object, _attribute: attrs.Attribute[str], value: str) -> None:
    if value:
        WsUrl.parse(value)


def _validate_name(_instance: object, _attribute: attrs.Attribute[str], value: str) -> None:
    if not value:
        raise ValueError("must not be empty")
    if any(ch.isspace() or ch == "/" or not ch.isprintable() for ch in value):
        raise ValueError(f"must not contain spaces, '/' or control characters, got {value!r}")


def _validate_tags(
    _instance: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    problems = [(f"[{i}]", "must not be empty") for i, tag in enumerate(value) if not tag]
    if problems:
        raise _ElementErrors(attribute.name, problems)


def _validate_unique_names(
    _instance: object,
    attribute: attrs.Attribute[tuple[ServerConfig, ...]],
    value: tuple[ServerConfig, ...],
) -> None:
    seen: set[str] = set()
    problems = []
    for i, server in enumerate(value):
        if server.name in seen:
            problems.append((f"[{i}].name", f"duplicate server name {server.name!r}"))
        seen.add(server.name)
    if problems:
        raise _ElementErrors(attribute.name, problems)


def _str_tuple(value: Iterable[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        raise TypeError("expected a sequence of strings, got a string")
    return tuple(value)


def _server_tuple(value: Iterable[ServerConfig]) -> tuple[ServerConfig, ...]:
    return tuple(value)


_WEB_ORIGIN = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://(?:[A-Za-z0-9._~-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")


def _validate_origins(
    _instance: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    problems = [
        (f"[{i}]", f"not an origin (scheme://host[:port], no path or trailing /), got {origin!r}")
        for i, origin in enumerate(value)
        if _WEB_ORIGIN.fullmatch(origin) is None
    ]
    if problems:
        raise _ElementErrors(attribute.name, problems)


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------


@attrs.frozen
class ProxyConfig:
    """The ``[proxy]`` table: the client-facing listener, its limits and its timeouts."""

    listen: str = attrs.field(default="0.0.0.0:9000", validator=_validate_listen)
    """Address clients connect to, ``host:port`` (``[v6]:port`` for IPv6); see `listen_address`."""
    max_connections: int = attrs.field(default=10000, validator=_at_least(1))
    """Most client connections open at once, in total; further upgrades are refused with 503."""
    max_connections_per_ip: int = attrs.field(default=0, validator=_at_least(0))
    """Most connections open at once from one client IP address (live and handshaking); 0: no limit."""
    max_message_size: int = attrs.field(default=1048576, validator=_at_least(125))
    """Largest message, and largest single frame, in bytes; a bigger one closes with 1009."""
    message_rate: float = attrs.field(default=0.0, validator=_seconds(allow_zero=True))
    """Messages per second one client may send on average (a token bucket); faster closes it with 1008
    after the messages before; 0: no limit."""
    message_burst: int = attrs.field(default=100, validator=_at_least(1))
    """Messages a client may send at once above ``message_rate`` (the bucket's size)."""
    handshake_timeout: float = attrs.field(default=10.0, validator=_seconds(allow_zero=False))
    """Seconds for the client's HTTP upgrade plus the backend's WebSocket handshake."""
    idle_timeout: float = attrs.field(default=300.0, validator=_seconds(allow_zero=True))
    """Seconds without traffic either way before the client is closed with 1001; 0 disables."""
    close_timeout: float = attrs.field(default=5.0, validator=_seconds(allow_zero=False))
    """Seconds to wait for the peer's answer to a close frame before dropping the connection."""
    drain_timeout: float = attrs.field(default=10.0, validator=_seconds(allow_zero=True))
    """On SIGINT/SIGTERM: seconds clients get after close 1001 before sessions are cancelled."""
    connect_timeout: float = attrs.field(default=5.0, validator=_seconds(allow_zero=False))
    """Seconds for one backend connection attempt (TCP connect plus WebSocket handshake)."""
    connect_attempts: int = attrs.field(default=3, validator=_at_least(1))
    """Distinct backends tried for one client before answering 502."""
    retry_after: int = attrs.field(default=5, validator=_at_least(0))
    """Seconds in the ``Retry-After`` header of a 503 (no backend can take the client)."""
    validate_utf8: bool = True
    """Check that text messages are valid UTF-8 (RFC 6455 8.1); an invalid one closes with 1007."""
    allowed_origins: tuple[str, ...] = attrs.field(
        default=(), converter=_str_tuple, validator=_validate_origins
    )
    """Origins (``scheme://host[:port]``) an upgrade may come from; empty: any, or none. Else 403."""
    tls_cert: str = ""
    """PEM file with the certificate chain clients see (``wss://``), read at start-up; empty: plain ws://."""
    tls_key: str = ""
    """PEM file with the private key of ``tls_cert`` (unencrypted), read at start-up."""
    tls_min_version: TlsVersion = attrs.field(default="1.2", validator=_one_of(TlsVersion))
    """Oldest TLS version a client may negotiate, ``"1.2"`` or ``"1.3"``."""

    def __attrs_post_init__(self) -> None:
        # Both or neither (each key alone has passed its own check): reported at the missing key.
        if self.tls_cert and not self.tls_key:
            raise _ElementErrors("proxy", [(".tls_key", "required with tls_cert")])
        if self.tls_key and not self.tls_cert:
            raise _ElementErrors("proxy", [(".tls_cert", "required with tls_key")])

    @property
    def tls(self) -> bool:
        """Whether clients connect with TLS (``wss://``)."""
        return bool(self.tls_cert)

    @property
    def listen_address(self) -> ListenAddress:
        """`listen`, parsed."""
        return ListenAddress.parse(self.listen)


@attrs.frozen
class BalancerConfig:
    """The ``[balancer]`` table: how a backend is chosen for a new client."""

    algorithm: Algorithm = attrs.field(default="least_connections", validator=_one_of(Algorithm))
    """One of `Algorithm`; least connections by default."""


@attrs.frozen
class ServerConfig:
    """One ``[[servers]]`` entry: a static backend game server."""

    name: str = attrs.field(validator=_validate_name)
    """Unique name of the backend (used in logs, metrics and the admin API)."""
    url: str = attrs.field(validator=_validate_url)
    """``ws://`` or ``wss://`` URL Atlas connects to; see `ws_url`."""
    capacity: int = attrs.field(default=1000, validator=_at_least(1))
    """Most clients this backend takes at once."""
    weight: int = attrs.field(default=1, validator=_at_least(1))
    """Relative share of clients for the weighted algorithms."""
    tags: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple, validator=_validate_tags)
    """Free-form labels (non-empty strings)."""
    control_url: str = attrs.field(default="", validator=_validate_optional_url)
    """``ws://`` or ``wss://`` URL of the server's control endpoint (docs/protocol.md); empty: a plain
    server, which gets blind transfers only."""

    @property
    def ws_url(self) -> WsUrl:
        """`url`, parsed."""
        return WsUrl.parse(self.url)


@attrs.frozen
class LoggingConfig:
    """The ``[logging]`` table."""

    level: LogLevel = attrs.field(default="info", validator=_one_of(LogLevel))
    """Least severe level written."""
    format: LogFormat = attrs.field(default="text", validator=_one_of(LogFormat))
    """``text`` for people, ``json`` (one object per line) for machines."""


ProbeKind = Literal["websocket", "http", "tcp"]
"""The active health-check probes `HealthConfig.probe` accepts."""


def _percent(_instance: object, _attribute: attrs.Attribute[int], value: int) -> None:
    if not 0 <= value <= 100:
        raise ValueError(f"must be 0..100, got {value}")


def _validate_path(_instance: object, _attribute: attrs.Attribute[str], value: str) -> None:
    if not value.startswith("/"):
        raise ValueError(f"must start with '/', got {value!r}")


@attrs.frozen
class HealthConfig:
    """The ``[health]`` table: active health checks, one checker per backend (Envoy-shaped)."""

    enabled: bool = True
    """Probe every backend; off, only passive signals (outlier detection) change a backend's health."""
    probe: ProbeKind = attrs.field(default="websocket", validator=_one_of(ProbeKind))
    """``websocket`` (a full opening handshake, then a clean close), ``http`` (GET, 2xx/3xx is healthy)
    or ``tcp`` (connect only)."""
    path: str = attrs.field(default="/", validator=_validate_path)
    """Request path of the ``websocket`` and ``http`` probes."""
    interval: float = attrs.field(default=5.0, validator=_seconds(allow_zero=False))
    """Seconds between two probes of one backend."""
    timeout: float = attrs.field(default=2.0, validator=_seconds(allow_zero=False))
    """Seconds one probe may take before it counts as a failure."""
    jitter: float = attrs.field(default=0.5, validator=_seconds(allow_zero=True))
    """Up to this many random seconds added to each interval, so probes do not align."""
    unhealthy_threshold: int = attrs.field(default=3, validator=_at_least(1))
    """Consecutive failed probes that make a healthy backend unhealthy."""
    healthy_threshold: int = attrs.field(default=2, validator=_at_least(1))
    """Consecutive successful probes that make an unhealthy backend healthy again."""
    heartbeat_timeout: float = attrs.field(default=90.0, validator=_seconds(allow_zero=False))
    """Registered (Horizon) servers: seconds without a heartbeat before Atlas probes the server and drops
    it once the probes fail."""


@attrs.frozen
class OutlierConfig:
    """The ``[outlier]`` table: passive outlier detection from real client traffic."""

    enabled: bool = True
    """Eject backends that keep failing real connections."""
    consecutive_failures: int = attrs.field(default=5, validator=_at_least(1))
    """Consecutive connect/handshake failures or abnormal closes that eject a backend."""
    base_ejection_time: float = attrs.field(default=30.0, validator=_seconds(allow_zero=False))
    """Seconds of the first ejection; each further ejection doubles it (exponential back-off)."""
    max_ejection_time: float = attrs.field(default=300.0, validator=_seconds(allow_zero=False))
    """Cap on one ejection's length."""
    max_ejection_percent: int = attrs.field(default=50, validator=_percent)
    """Never eject more than this share of the backends at once (at least one is always allowed)."""


@attrs.frozen
class FailoverConfig:
    """The ``[failover]`` table: moving live clients off a backend that died or was ejected."""

    enabled: bool = True
    """Reconnect a failed backend's clients to healthy backends, keeping their connections open."""
    notice: str = ""
    """Text message sent to a client after it was moved (empty: none)."""
    timeout: float = attrs.field(default=10.0, validator=_seconds(allow_zero=False))
    """Seconds one client's failover may take (finding and connecting a new backend)."""
    hold_limit: int = attrs.field(default=1048576, validator=_at_least(1024))
    """Bytes of client messages held during a switch; past it Atlas stops reading from that client."""


@attrs.frozen
class TransferConfig:
    """The ``[transfer]`` table: seamless client transfers, drain and the rebalancer."""

    timeout: float = attrs.field(default=5.0, validator=_seconds(allow_zero=False))
    """Seconds one transfer may take from request to switch (a prepared one: from when it is used);
    past it, it rolls back."""
    drain_rate: float = attrs.field(default=50.0, validator=_seconds(allow_zero=False))
    """Clients per second a drain moves off a backend (reason ``maintenance``)."""
    rebalance: bool = False
    """Move clients from overloaded backends to underloaded ones (reason ``load_balancing``)."""
    high_watermark: float = attrs.field(default=0.8, validator=_seconds(allow_zero=False))
    """A backend above this load (connections / capacity) gives clients away."""
    low_watermark: float = attrs.field(default=0.5, validator=_seconds(allow_zero=True))
    """A backend below this load takes them."""
    rebalance_interval: float = attrs.field(default=5.0, validator=_seconds(allow_zero=False))
    """Seconds between two rebalancing rounds."""
    rebalance_batch: int = attrs.field(default=10, validator=_at_least(1))
    """Most clients one rebalancing round moves."""
    cooldown: float = attrs.field(default=60.0, validator=_seconds(allow_zero=True))
    """Seconds before the rebalancer moves the same client again."""

    @low_watermark.validator
    def _below_high(self, _attribute: attrs.Attribute[float], value: float) -> None:
        # Checked when the record is built (the per-field pass has no record yet: self is None then).
        if self is not None and value > self.high_watermark:
            raise ValueError(f"low_watermark ({value}) must be <= high_watermark ({self.high_watermark})")


def _vector(
    _instance: object, _attribute: attrs.Attribute[tuple[float, ...]], value: tuple[float, ...]
) -> None:
    if len(value) != 3:
        raise ValueError(f"expected 3 numbers [x, y, z], got {len(value)}")
    if not all(math.isfinite(v) for v in value):
        raise ValueError("expected finite numbers")


def _cell(_instance: object, _attribute: attrs.Attribute[tuple[int, ...]], value: tuple[int, ...]) -> None:
    if len(value) != 3:
        raise ValueError(f"expected 3 integers [x, y, z], got {len(value)}")


def _float_tuple(value: Iterable[float]) -> tuple[float, ...]:
    return tuple(float(v) for v in value)


def _import_path(_instance: object, _attribute: attrs.Attribute[str], value: str) -> None:
    module, _, name = value.partition(":")
    if not module or not name:
        raise ValueError(f"expected 'package.module:ClassName', got {value!r}")


_ORIGIN = (0.0, 0.0, 0.0)


def _int_tuple(value: Iterable[int]) -> tuple[int, ...]:
    return tuple(value)


SkimDirection = Literal["up", "down"]
"""A direction the skim tap may watch: ``up`` (client to server) or ``down``."""

SpawnRule = Literal["balancer", "region"]
"""How `WorldConfig.spawn` places a new client."""


def _directions(value: Iterable[SkimDirection]) -> tuple[SkimDirection, ...]:
    return tuple(value)


@attrs.frozen
class SkimConfig:
    """The ``[skim]`` table: the relay's tap and the analyzers behind it (docs/skimming.md)."""

    enabled: bool = True
    """Offer relayed messages to the analyzers (never slowing the relay: a full channel drops)."""
    directions: tuple[SkimDirection, ...] = attrs.field(default=("up",), converter=_directions)
    """Which directions are skimmed: ``up`` (client to server), ``down``, or both."""
    text_only: bool = True
    """Skim text messages only; off adds binary ones."""
    max_size: int = attrs.field(default=1024, validator=_at_least(1))
    """Messages larger than this many bytes are never skimmed."""
    sample_every: int = attrs.field(default=1, validator=_at_least(1))
    """Skim one eligible message in this many, per client and direction."""
    buffer: int = attrs.field(default=1024, validator=_at_least(1))
    """Size of the tap's channel; a full channel drops (counted in ``atlas_skim_dropped_total``)."""
    analyzer_buffer: int = attrs.field(default=256, validator=_at_least(1))
    """Size of each analyzer's own channel."""
    tap_buffer: int = attrs.field(default=64, validator=_at_least(1))
    """Size of each live tap's channel (``GET /api/v1/clients/{id}/tap``)."""
    batch_interval: float = attrs.field(default=0.01, validator=_seconds(allow_zero=True))
    """Seconds the analyzers' fan-out pauses between two batches while frames keep coming (at most 1;
    0: hand on each batch at once). Longer: less scheduling cost at high rates, later analysis."""

    @batch_interval.validator
    def _at_most_a_second(self, _attribute: attrs.Attribute[float], value: float) -> None:
        if value > 1:
            raise ValueError(f"must be <= 1 second, got {value}")


@attrs.frozen
class AnalyzerConfig:
    """One ``[[analyzers]]`` entry: an analyzer class by import path, and its options."""

    path: str = attrs.field(validator=_import_path)
    """``package.module:ClassName`` of a class implementing ``atlas.skim.Analyzer``."""
    options: dict[str, Any] = attrs.field(factory=dict)
    """Keyword arguments for the class."""


_BUILTIN_ANALYZERS = (
    AnalyzerConfig(path="atlas.skim:MovementAnalyzer"),
    AnalyzerConfig(path="atlas.skim:EventAnalyzer"),
)


def _analyzers(value: Iterable[AnalyzerConfig]) -> tuple[AnalyzerConfig, ...]:
    return tuple(value)


@attrs.frozen
class RegionConfig:
    """One ``[[world.regions]]`` entry: an axis-aligned box owned by a backend."""

    id: str = attrs.field(validator=_validate_name)
    """The region's name."""
    owner: str = attrs.field(validator=_validate_name)
    """Name of the backend that owns the region."""
    min: tuple[float, ...] = attrs.field(converter=_float_tuple, validator=_vector)
    """Lowest corner ``[x, y, z]`` (inclusive)."""
    max: tuple[float, ...] = attrs.field(converter=_float_tuple, validator=_vector)
    """Highest corner ``[x, y, z]`` (exclusive); greater than `min` on every axis."""


@attrs.frozen
class CellConfig:
    """One ``[[world.cells]]`` entry: a grid cell owned by a backend."""

    cell: tuple[int, ...] = attrs.field(converter=_int_tuple, validator=_cell)
    """Integer cell coordinates ``[x, y, z]``."""
    owner: str = attrs.field(validator=_validate_name)
    """Name of the backend that owns the cell."""


def _regions(value: Iterable[RegionConfig]) -> tuple[RegionConfig, ...]:
    return tuple(value)


def _cells(value: Iterable[CellConfig]) -> tuple[CellConfig, ...]:
    return tuple(value)


@attrs.frozen
class WorldConfig:
    """The ``[world]`` table: regions of the game world and who owns them (docs/world.md)."""

    spawn: SpawnRule = attrs.field(default="balancer", validator=_one_of(SpawnRule))
    """``balancer``: new clients go where the balancer says; ``region``: to the owner of the region
    containing `spawn_point` (the balancer when nobody owns it)."""
    spawn_point: tuple[float, ...] = attrs.field(
        default=(0.0, 0.0, 0.0), converter=_float_tuple, validator=_vector
    )
    """Where new players appear, ``[x, y, z]``."""
    spawn_nearest: bool = False
    """With ``spawn = "region"``: when no region contains the spawn point, use the nearest one."""
    cell_size: tuple[float, ...] = attrs.field(
        default=(0.0, 0.0, 0.0), converter=_float_tuple, validator=_vector
    )
    """Size of a grid cell ``[x, y, z]``; all three > 0 makes a grid (``[[world.cells]]``)."""
    origin: tuple[float, ...] = attrs.field(
        default=(0.0, 0.0, 0.0), converter=_float_tuple, validator=_vector
    )
    """Corner of cell ``[0, 0, 0]``."""
    horizon: bool = True
    """Build the grid from Horizon registrations (``region_coord``, ``center``, ``bounds``)."""
    horizon_z_size: float = attrs.field(default=200.0, validator=_seconds(allow_zero=False))
    """Height of a Horizon cell (Horizon's ``bounds`` only describes x and y)."""
    regions: tuple[RegionConfig, ...] = attrs.field(default=(), converter=_regions)
    """Explicit regions (boxes)."""
    cells: tuple[CellConfig, ...] = attrs.field(default=(), converter=_cells)
    """Owned grid cells (needs `cell_size`)."""


@attrs.frozen
class PredictorConfig:
    """The ``[predictor]`` table: predictive region transitions (docs/world.md)."""

    enabled: bool = True
    """Prepare and transfer clients that cross region boundaries (needs a world with regions)."""
    lookahead: float = attrs.field(default=0.5, validator=_seconds(allow_zero=False))
    """Seconds ahead the position is predicted."""
    margin: float = attrs.field(default=5.0, validator=_seconds(allow_zero=True))
    """Prepare when the predicted position is this close to another region (world units), approaching."""
    hysteresis: float = attrs.field(default=2.0, validator=_seconds(allow_zero=True))
    """Transfer once the client is this far inside the other region (world units)."""
    prepare_ttl: float = attrs.field(default=3.0, validator=_seconds(allow_zero=False))
    """Seconds an unused preparation lives after the last observation that called for it."""
    smoothing: float = attrs.field(default=0.5, validator=_seconds(allow_zero=False))
    """Weight of a new observation in the smoothed position and velocity (0..1]."""
    use_acceleration: bool = False
    """Include the smoothed acceleration in the prediction."""
    retry_delay: float = attrs.field(default=1.0, validator=_seconds(allow_zero=True))
    """Seconds before a refused or rolled-back region transfer is asked again."""
    min_interval: float = attrs.field(default=0.01, validator=_seconds(allow_zero=True))
    """Observations closer together than this are merged (messages read in one burst)."""


@attrs.frozen
class AdminConfig:
    """The ``[admin]`` table: the ops HTTP server (admin API, metrics, Horizon registration)."""

    enabled: bool = True
    """Run the ops server."""
    listen: str = attrs.field(default="127.0.0.1:9001", validator=_validate_listen)
    """Address of the ops server; a non-loopback address requires a `token`."""
    token: str = ""
    """Bearer token required on every admin endpoint (empty: none, allowed on loopback only)."""
    heartbeat_interval: int = attrs.field(default=30, validator=_at_least(1))
    """Heartbeat interval told to registering (Horizon) servers, in seconds."""
    allow_registration: bool = True
    """Accept Horizon-style server registration (it carries no token: keep the ops server on a private
    network, or switch this off)."""


#: JWT algorithms `AuthConfig.algorithms` accepts: HMAC (``HS*``) and public-key (``RS*``, ``PS*``, ``ES*``).
JWT_ALGORITHMS = (
    "HS256",
    "HS384",
    "HS512",
    "RS256",
    "RS384",
    "RS512",
    "PS256",
    "PS384",
    "PS512",
    "ES256",
    "ES384",
    "ES512",
)
_QUERY_PARAM = re.compile(r"[A-Za-z0-9._~-]+")


def _validate_algorithms(
    _instance: object, attribute: attrs.Attribute[tuple[str, ...]], value: tuple[str, ...]
) -> None:
    if not value:
        raise ValueError("must list at least one algorithm")
    problems = []
    for i, name in enumerate(value):
        if name.lower() == "none":
            problems.append((f"[{i}]", "'none' is refused: it would accept unsigned tokens"))
        elif name not in JWT_ALGORITHMS:
            problems.append(
                (f"[{i}]", f"unsupported algorithm {name!r} (one of {', '.join(JWT_ALGORITHMS)})")
            )
    if problems:
        raise _ElementErrors(attribute.name, problems)


def _validate_claim(_instance: object, _attribute: attrs.Attribute[str], value: str) -> None:
    if not value:
        raise ValueError("must not be empty")


def _validate_query_param(_instance: object, _attribute: attrs.Attribute[str], value: str) -> None:
    if value and _QUERY_PARAM.fullmatch(value) is None:
        raise ValueError(f"must be empty or letters, digits and . _ ~ -, got {value!r}")


@attrs.frozen
class AuthConfig:
    """The ``[auth]`` table: JWT bearer tokens checked at the WebSocket handshake."""

    enabled: bool = False
    """Require a valid token on every upgrade; a missing or invalid one is answered 401."""
    algorithms: tuple[str, ...] = attrs.field(
        default=("HS256",), converter=_str_tuple, validator=_validate_algorithms
    )
    """Algorithms a token may be signed with (an allow-list; ``none`` is refused)."""
    secret: str = ""
    """The shared secret of the ``HS*`` algorithms (at least as many bytes as the hash)."""
    public_key_file: str = ""
    """PEM file with the public key of the ``RS*``, ``PS*`` and ``ES*`` algorithms, read at start-up."""
    issuer: str = ""
    """Required ``iss`` claim; empty: not checked."""
    audience: str = ""
    """Required ``aud`` claim; empty: not checked (a token carrying ``aud`` is then refused)."""
    leeway: float = attrs.field(default=0.0, validator=_seconds(allow_zero=True))
    """Seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``."""
    claim: str = attrs.field(default="sub", validator=_validate_claim)
    """The claim that holds the player id (a non-empty string)."""
    query_param: str = attrs.field(default="token", validator=_validate_query_param)
    """Query parameter that may carry the token (when there is no ``Authorization`` header); empty: none."""

    def __attrs_post_init__(self) -> None:
        # Checked when the record is built (the per-field pass has checked each key alone): only an
        # enabled table must be complete. Reported at the key, ``auth.secret: required by HS256``.
        problem = self._incomplete() if self.enabled else None
        if problem is not None:
            raise _ElementErrors("auth", [(f".{problem[0]}", problem[1])])

    def _incomplete(self) -> tuple[str, str] | None:
        """The key that the enabled table misses or gets wrong, and why; None when it is complete."""
        hmac = [name for name in self.algorithms if name.startswith("HS")]
        public = [name for name in self.algorithms if not name.startswith("HS")]
        if hmac and public:
            return (
                "algorithms",
                "HS* and public-key algorithms cannot be mixed (a public key must not pass as a secret)",
            )
        if public:
            return ("public_key_file", f"required by {public[0]}") if not self.public_key_file else None
        if not self.secret:
            return "secret", f"required by {hmac[0]}"
        strongest = max(hmac, key=lambda name: int(name[2:]))
        needed, length = int(strongest[2:]) // 8, len(self.secret.encode("utf-8"))
        if length < needed:
            return "secret", f"must be at least {needed} bytes for {strongest} (RFC 7518 3.2), got {length}"
        return None


@attrs.frozen
class Config:
    """A whole Atlas configuration.

    Build one with `Config.default`, `Config.from_toml` or `Config.from_file`; `to_toml` writes it
    back.
    A file without ``[[servers]]`` has no static servers (backends may register later), whereas
    `Config.default` (no file at all) has three demo servers.
    """

    proxy: ProxyConfig = ProxyConfig()
    """The ``[proxy]`` table."""
    balancer: BalancerConfig = BalancerConfig()
    """The ``[balancer]`` table."""
    servers: tuple[ServerConfig, ...] = attrs.field(
        default=(), converter=_server_tuple, validator=_validate_unique_names
    )
    """The ``[[servers]]`` entries, in file order; names are unique."""
    logging: LoggingConfig = LoggingConfig()
    """The ``[logging]`` table."""
    health: HealthConfig = HealthConfig()
    """The ``[health]`` table."""
    outlier: OutlierConfig = OutlierConfig()
    """The ``[outlier]`` table."""
    failover: FailoverConfig = FailoverConfig()
    """The ``[failover]`` table."""
    transfer: TransferConfig = TransferConfig()
    """The ``[transfer]`` table."""
    admin: AdminConfig = AdminConfig()
    """The ``[admin]`` table."""
    skim: SkimConfig = SkimConfig()
    """The ``[skim]`` table."""
    analyzers: tuple[AnalyzerConfig, ...] = attrs.field(default=_BUILTIN_ANALYZERS, converter=_analyzers)
    """The ``[[analyzers]]`` entries; a file without any gets the built-in movement and event analyzers,
    ``analyzers = []`` runs none."""
    world: WorldConfig = WorldConfig()
    """The ``[world]`` table."""
    predictor: PredictorConfig = PredictorConfig()
    """The ``[predictor]`` table."""
    auth: AuthConfig = AuthConfig()
    """The ``[auth]`` table."""

    @classmethod
    def default(cls) -> Config:
        """The embedded default: every table at its defaults, plus three demo servers.

        ``game-server-1`` .. ``game-server-3`` at ``ws://127.0.0.1:8080`` .. ``:8082``, capacity
        1000, weight 1, each with its control endpoint at ``/atlas/control`` on the same port (the demo
        cluster's SDK servers serve one there). This is what ``atlas serve`` uses without ``--config``.
        """
        return cls(
            servers=tuple(
                ServerConfig(
                    name=f"game-server-{i + 1}",
                    url=f"ws://127.0.0.1:{8080 + i}",
                    control_url=f"ws://127.0.0.1:{8080 + i}/atlas/control",
                )
                for i in range(3)
            )
        )

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<config>") -> Config:
        """Parse and validate a TOML document.

        Missing tables and keys take their defaults. Raises `ConfigError` listing every problem as
        a ``path: reason`` line; a syntax error is ``<source>: invalid TOML: <message>`` (the
        message ends with the line and column).
        """
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([f"{source}: invalid TOML: {exc}"]) from None
        try:
            return _converter.structure(data, cls)
        except Exception as exc:  # every failure becomes path: reason lines
            errors = _error_lines(exc, path="", root=source)
        raise ConfigError(errors)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Config:
        """Read and validate a TOML file; see `from_toml`.

        Raises `ConfigError`; a file that cannot be read gives ``<path>: cannot read: <reason>``.
        """
        name = os.fspath(path)
        try:
            with open(path, "rb") as file:
                raw = file.read()
        except OSError as exc:
            raise ConfigError([f"{name}: cannot read: {exc.strerror or exc}"]) from None
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            reason = f"not UTF-8 (byte {exc.start})"
            raise ConfigError([f"{name}: invalid TOML: {reason}"]) from None
        return cls.from_toml(text, source=name)

    def to_toml(self) -> str:
        """Write every key of every table, defaults included, so ``from_toml(c.to_toml()) == c``."""
        data: dict[str, Any] = _converter.unstructure(self)
        if not self.servers:
            return tomli_w.dumps(data)  # "servers = []" first, then the tables
        # Tables first, then one [[servers]] block per server: tomli-w alone would pick inline
        # tables for short entries, which read worse and differ from the documentation.
        servers = data.pop("servers")
        blocks = [tomli_w.dumps(data)]
        blocks += [f"[[servers]]\n{tomli_w.dumps(server)}" for server in servers]
        return "\n".join(blocks)


_DEFAULT_HEADER = """\
# Atlas configuration, written by `atlas init`. Every key is shown with its default value.
# Check it with `atlas check FILE`, run with `atlas serve --config FILE`.
# Every key is described in docs/configuration.md.

"""


def write_default_config(path: str | os.PathLike[str], *, force: bool = False) -> None:
    """Write `Config.default` as TOML, under a short header comment, to *path* (for ``atlas init``).

    Refuses to replace an existing file unless *force*: raises `ConfigError` with
    ``<path>: exists (use --force)``; any other failure is ``<path>: cannot write: <reason>``.
    """
    name = os.fspath(path)
    text = _DEFAULT_HEADER + Config.default().to_toml()
    try:
        # Mode "x" checks and creates in one step, so a file appearing meanwhile is not clobbered.
        with open(path, "w" if force else "x", encoding="utf-8") as file:
            file.write(text)
    except FileExistsError:
        raise ConfigError([f"{name}: exists (use --force)"]) from None
    except OSError as exc:
        raise ConfigError([f"{name}: cannot write: {exc.strerror or exc}"]) from None


# ------------------------------------------------------------------------------------------------
# The converter
# ------------------------------------------------------------------------------------------------

_converter = make_converter(forbid_extra_keys=True)

_RECORDS = (
    ProxyConfig,
    BalancerConfig,
    ServerConfig,
    LoggingConfig,
    HealthConfig,
    OutlierConfig,
    FailoverConfig,
    TransferConfig,
    AdminConfig,
    SkimConfig,
    AnalyzerConfig,
    RegionConfig,
    CellConfig,
    WorldConfig,
    PredictorConfig,
    AuthConfig,
    Config,
)


def _describe(value: object) -> str:
    """Name a TOML value in an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, datetime | date | time):
        return f"a date/time ({value.isoformat()})"
    return repr(value)


def _structure_str(value: object, _type: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {_describe(value)}")
    return value


def _structure_int(value: object, _type: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {_describe(value)}")
    return value


def _structure_float(value: object, _type: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {_describe(value)}")
    try:
        result = float(value)
    except OverflowError:
        result = math.inf
    if not math.isfinite(result):
        raise ValueError(f"expected a finite number, got {_describe(value)}")
    return result


def _structure_bool(value: object, _type: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"expected true or false, got {_describe(value)}")
    return value


def _is_literal(type_: Any) -> bool:
    return get_origin(type_) is Literal


def _literal_hook(type_: Any) -> Callable[[object, object], object]:
    choices = get_args(type_)

    def structure(value: object, _type: object) -> object:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return value

    return structure


def _is_homogeneous_tuple(type_: Any) -> bool:
    args = get_args(type_)
    return get_origin(type_) is tuple and len(args) == 2 and args[1] is Ellipsis


def _tuple_hook(type_: Any) -> Callable[[object, object], tuple[Any, ...]]:
    item_type = get_args(type_)[0]
    expected = "an array of tables" if attrs.has(item_type) else "an array"

    def structure(value: object, _type: object) -> tuple[Any, ...]:
        # cattrs would happily iterate a string into characters: only a TOML array will do.
        if not isinstance(value, list):
            raise TypeError(f"expected {expected}, got {_describe(value)}")
        items = []
        errors: list[Exception] = []
        for index, item in enumerate(value):
            try:
                items.append(_converter.structure(item, item_type))
            except Exception as exc:  # collected, reported with its index
                exc.add_note(IterableValidationNote(f"index {index}", index, item_type))
                errors.append(exc)
        if errors:
            raise IterableValidationError(f"While structuring {type_!r}", errors, tuple)
        return tuple(items)

    return structure


def _validated(attribute: attrs.Attribute[Any]) -> Callable[[object, Any], Any]:
    """A structure hook for one field: structure by type, then run that field's attrs validator."""
    validator = attribute.validator
    assert validator is not None

    def structure(value: object, type_: Any) -> Any:
        result = _converter.structure(value, type_)
        validator(None, attribute, result)
        return result

    return structure


def _record_hook(cls: type[Any]) -> Callable[[object, object], Any]:
    # Built lazily (a hook factory), once every other hook is registered.
    overrides = {
        a.name: cattrs.gen.override(struct_hook=_validated(a))
        for a in attrs.fields(cls)
        if a.validator is not None
    }
    # mypy cannot tell that the overrides (keyed by field name) miss the named parameters.
    structure_dict = cattrs.gen.make_dict_structure_fn(cls, _converter, **overrides)  # type: ignore[arg-type]

    def structure(value: object, _type: object) -> Any:
        if not isinstance(value, dict):
            raise TypeError(f"expected a table, got {_describe(value)}")
        return structure_dict(value, cls)

    return structure


_converter.register_structure_hook(str, _structure_str)
_converter.register_structure_hook(int, _structure_int)
_converter.register_structure_hook(float, _structure_float)
_converter.register_structure_hook(bool, _structure_bool)
_converter.register_structure_hook_factory(_is_literal, _literal_hook)
_converter.register_structure_hook_factory(_is_homogeneous_tuple, _tuple_hook)
_converter.register_structure_hook_factory(lambda t: t in _RECORDS, _record_hook)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _error_lines(exc: BaseException, path: str, root: str) -> list[str]:
    """Flatten cattrs' exception tree into ``path: reason`` lines, in field order.

    *root* names the document in the (unexpected) case of a problem with no key to point at.
    """
    lines: list[str] = []
    if isinstance(exc, ClassValidationError):
        with_notes, without = exc.group_exceptions()
        for sub, attribute_note in with_notes:
            lines += _error_lines(sub, _join(path, attribute_note.name), root)
        for sub in without:
            lines += _error_lines(sub, path, root)
    elif isinstance(exc, IterableValidationError):
        with_index, without = exc.group_exceptions()
        for sub, index_note in with_index:
            lines += _error_lines(sub, f"{path}[{index_note.index}]", root)
        for sub in without:
            lines += _error_lines(sub, path, root)
    elif isinstance(exc, ForbiddenExtraKeysError):
        lines += [f"{_join(path, key)}: unknown key" for key in sorted(exc.extra_fields)]
    elif isinstance(exc, KeyError):
        lines.append(f"{path or root}: missing required key")
    elif isinstance(exc, _ElementErrors):
        lines += [f"{path}{sub}: {reason}" for sub, reason in exc.problems]
    else:
        lines.append(f"{path or root}: {exc}")
    return lines

"""Tests for atlas.config: defaults, round trips, one exact ``path: reason`` line per mistake."""

from __future__ import annotations

import os
import re
import string
from pathlib import Path
from typing import get_args

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from atlas.config import (
    AdminConfig,
    Algorithm,
    AnalyzerConfig,
    AuthConfig,
    BalancerConfig,
    CellConfig,
    Config,
    FailoverConfig,
    HealthConfig,
    ListenAddress,
    LogFormat,
    LoggingConfig,
    LogLevel,
    OutlierConfig,
    PredictorConfig,
    ProxyConfig,
    RegionConfig,
    ServerConfig,
    SkimConfig,
    TransferConfig,
    WorldConfig,
    WsUrl,
    parse_ws_url,
    write_default_config,
)
from atlas.errors import ConfigError
from atlas.runtime import Runtime

DOCS = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

# The configuration from the issue: the seed's three demo servers behind 0.0.0.0:9000.
ISSUE_EXAMPLE = """\
[proxy]
listen = "0.0.0.0:9000"
max_connections = 10000

[balancer]
algorithm = "least_connections"

[[servers]]
name = "game-server-1"
url = "ws://127.0.0.1:8080"
capacity = 1000

[[servers]]
name = "game-server-2"
url = "ws://127.0.0.1:8081"
capacity = 1000

[[servers]]
name = "game-server-3"
url = "ws://127.0.0.1:8082"
capacity = 1000
"""

SERVER = '[[servers]]\nname = "s"\n'  # a server entry still missing its url


def errors_of(text: str) -> list[str]:
    """The error lines `Config.from_toml` reports for *text* (which must be invalid)."""
    with pytest.raises(ConfigError) as info:
        Config.from_toml(text, source="atlas.toml")
    assert str(info.value) == "\n".join(info.value.errors)
    return list(info.value.errors)


def toml_blocks(markdown: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", markdown, flags=re.DOTALL)


# --------------------------------------------------------------------------------------------------
# Defaults and valid files
# --------------------------------------------------------------------------------------------------


def test_default_config_has_three_demo_servers() -> None:
    config = Config.default()
    assert [(s.name, s.url, s.capacity, s.weight, s.tags) for s in config.servers] == [
        ("game-server-1", "ws://127.0.0.1:8080", 1000, 1, ()),
        ("game-server-2", "ws://127.0.0.1:8081", 1000, 1, ()),
        ("game-server-3", "ws://127.0.0.1:8082", 1000, 1, ()),
    ]
    assert config.proxy == ProxyConfig()
    assert config.proxy.listen_address == ListenAddress("0.0.0.0", 9000)
    assert config.proxy.max_connections == 10000
    assert config.proxy.max_message_size == 1048576
    assert config.proxy.idle_timeout == 300.0
    assert config.proxy.validate_utf8 is True
    assert config.balancer.algorithm == "least_connections"
    assert config.logging == LoggingConfig(level="info", format="text")


def test_empty_file_has_defaults_and_no_servers() -> None:
    assert Config.from_toml("") == Config()
    assert Config().servers == ()


def test_issue_example_parses() -> None:
    config = Config.from_toml(ISSUE_EXAMPLE)
    # The embedded default also names each demo server's control endpoint; the issue's shape has none.
    default = Config.default()
    plain = tuple(attrs.evolve(server, control_url="") for server in default.servers)
    assert config == attrs.evolve(default, servers=plain)
    assert config.servers[1].ws_url == WsUrl(False, "127.0.0.1", 8081, "/")


def test_missing_keys_take_defaults() -> None:
    config = Config.from_toml('[proxy]\nidle_timeout = 0\n[[servers]]\nname = "a"\nurl = "ws://a"\n')
    assert config.proxy == ProxyConfig(idle_timeout=0.0)
    assert config.servers == (ServerConfig(name="a", url="ws://a"),)
    assert config.balancer == BalancerConfig()


def test_integer_seconds_become_floats() -> None:
    timeout = Config.from_toml("[proxy]\nhandshake_timeout = 3\n").proxy.handshake_timeout
    assert timeout == 3.0
    assert isinstance(timeout, float)


def test_documented_examples_parse() -> None:
    blocks = toml_blocks(DOCS.read_text(encoding="utf-8"), "toml")
    full, small, examples = blocks[0], blocks[1], blocks[2:-1]  # the last one is the invalid file
    for example in examples:
        Config.from_toml(example)
    assert Config.from_toml(full) == Config.default()
    assert Config.from_toml(full).to_toml() == full
    config = Config.from_toml(small)
    assert config.proxy.listen_address == ListenAddress("::", 9000)
    assert config.servers[0].ws_url == WsUrl(True, "eu-1.example.net", 443, "/game?build=42")
    assert config.servers[0].tags == ("eu", "pvp")


def test_documented_error_example_is_exact() -> None:
    markdown = DOCS.read_text(encoding="utf-8")
    invalid = toml_blocks(markdown, "toml")[-1]
    expected = toml_blocks(markdown, "text")[0]
    assert errors_of(invalid) == expected.splitlines()


def test_docs_describe_every_key() -> None:
    markdown = DOCS.read_text(encoding="utf-8")
    for record in (
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
        WorldConfig,
        RegionConfig,
        CellConfig,
        PredictorConfig,
        AuthConfig,
    ):
        for field in record.__attrs_attrs__:
            assert f"| `{field.name}` |" in markdown, field.name


# --------------------------------------------------------------------------------------------------
# Round trips (hypothesis)
# --------------------------------------------------------------------------------------------------

_LABEL = r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?"
hostnames = st.from_regex(rf"{_LABEL}(\.{_LABEL}){{0,3}}", fullmatch=True)
hosts = st.one_of(
    st.sampled_from(["localhost", "0.0.0.0", "::"]),
    hostnames,
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
)
listen_addresses = st.builds(ListenAddress, hosts, st.integers(0, 65535))
resources = st.from_regex(r"/([A-Za-z0-9._~-]+/?)*(\?[A-Za-z0-9=&]*)?", fullmatch=True)
ws_urls = st.builds(WsUrl, st.booleans(), hosts, st.integers(1, 65535), resources)

positive_ints = st.integers(1, 2**63 - 1)
seconds_positive = st.floats(0, 1e9, exclude_min=True, allow_nan=False)
seconds_or_zero = st.floats(0, 1e9, allow_nan=False)


def _valid_name(name: str) -> bool:
    try:
        ServerConfig(name=name, url="ws://h")
    except ValueError:
        return False
    return True


proxies = st.builds(
    ProxyConfig,
    listen=listen_addresses.map(str),
    max_connections=positive_ints,
    max_connections_per_ip=st.integers(0, 2**63 - 1),
    max_message_size=st.integers(125, 2**63 - 1),
    handshake_timeout=seconds_positive,
    idle_timeout=seconds_or_zero,
    close_timeout=seconds_positive,
    drain_timeout=seconds_or_zero,
    connect_timeout=seconds_positive,
    connect_attempts=positive_ints,
    retry_after=st.integers(0, 2**63 - 1),
    validate_utf8=st.booleans(),
    allowed_origins=st.lists(
        st.builds(
            "{}://{}{}".format,
            st.sampled_from(["http", "https", "app"]),
            hostnames,
            st.sampled_from(["", ":8080"]),
        )
    ).map(tuple),
)
servers = st.builds(
    ServerConfig,
    name=st.text(min_size=1, max_size=12).filter(_valid_name),
    url=ws_urls.map(str),
    capacity=positive_ints,
    weight=positive_ints,
    tags=st.lists(st.text(min_size=1, max_size=8), max_size=3).map(tuple),
)
configs = st.builds(
    Config,
    proxy=proxies,
    balancer=st.builds(BalancerConfig, st.sampled_from(get_args(Algorithm))),
    servers=st.lists(servers, max_size=4, unique_by=lambda s: s.name).map(tuple),
    logging=st.builds(
        LoggingConfig, st.sampled_from(get_args(LogLevel)), st.sampled_from(get_args(LogFormat))
    ),
)


@given(configs)
def test_to_toml_round_trips(config: Config) -> None:
    assert Config.from_toml(config.to_toml()) == config


@given(listen_addresses)
def test_listen_address_round_trips(address: ListenAddress) -> None:
    assert ListenAddress.parse(str(address)) == address


@given(ws_urls)
def test_ws_url_round_trips(url: WsUrl) -> None:
    assert parse_ws_url(str(url)) == url


# --------------------------------------------------------------------------------------------------
# Addresses and URLs
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:9000", ListenAddress("0.0.0.0", 9000)),
        ("localhost:0", ListenAddress("localhost", 0)),
        ("[::]:9000", ListenAddress("::", 9000)),
        ("[::1]:65535", ListenAddress("::1", 65535)),
    ],
)
def test_listen_address_parse(text: str, expected: ListenAddress) -> None:
    assert ListenAddress.parse(text) == expected
    assert str(expected) == text


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("9000", "expected host:port, got '9000'"),
        (":9000", "expected host:port, got ':9000'"),
        ("[::1]", "expected host:port, got '[::1]'"),
        ("::1:9000", "expected host:port, got '::1:9000' (write IPv6 as [addr]:port)"),
        ("host:http", "port must be a number, got 'http'"),
        ("host:-1", "port must be a number, got '-1'"),
        ("999.1.1.1:80", "invalid IPv4 address '999.1.1.1'"),
        ("[::g]:80", "invalid IPv6 address '::g'"),
        ("a b:80", "invalid host 'a b'"),
    ],
)
def test_listen_address_rejects(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        ListenAddress.parse(text)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://127.0.0.1:8080", (False, "127.0.0.1", 8080, "/")),
        ("wss://game.example.com", (True, "game.example.com", 443, "/")),
        ("ws://game.example.com/play", (False, "game.example.com", 80, "/play")),
        ("WS://[::1]:9/a/b?room=3&x", (False, "::1", 9, "/a/b?room=3&x")),
        ("ws://h?q=1", (False, "h", 80, "/?q=1")),
    ],
)
def test_parse_ws_url(url: str, expected: tuple[bool, str, int, str]) -> None:
    parsed = parse_ws_url(url)
    assert (parsed.secure, parsed.host, parsed.port, parsed.resource) == expected


def test_ws_url_host_header() -> None:
    assert parse_ws_url("wss://h:443/x").host_header == "h"
    assert parse_ws_url("ws://[::1]:8080").host_header == "[::1]:8080"
    assert str(parse_ws_url("ws://[::1]")) == "ws://[::1]/"


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://h", "not a ws:// or wss:// URL"),
        ("127.0.0.1:8080", "not a ws:// or wss:// URL"),
        ("ws:///path", "missing host"),
        ("ws://:80", "missing host"),
        ("ws://h:0", "port must be 1..65535, got 0"),
        ("ws://h:x", "port must be a number, got 'x'"),
        ("ws://user@h", "must not contain user info (user@host)"),
        ("ws://h/#top", "must not contain a fragment (#...)"),
        ("ws://h/a b", "must not contain spaces or control characters"),
        ("ws://::1:80", "invalid host and port '::1:80' (write IPv6 as [addr])"),
    ],
)
def test_parse_ws_url_rejects(url: str, reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        parse_ws_url(url)


# --------------------------------------------------------------------------------------------------
# One test per kind of mistake, each with its exact line
# --------------------------------------------------------------------------------------------------


def test_unknown_key_at_top_level() -> None:
    assert errors_of("bogus = 1\n") == ["bogus: unknown key"]


def test_unknown_key_in_a_table() -> None:
    assert errors_of("[proxy]\nbogus = 1\n") == ["proxy.bogus: unknown key"]


def test_unknown_key_in_a_server() -> None:
    text = SERVER + 'url = "ws://h"\nport = 1\n'
    assert errors_of(text) == ["servers[0].port: unknown key"]


def test_wrong_type() -> None:
    assert errors_of('[proxy]\nidle_timeout = "abc"\n') == [
        "proxy.idle_timeout: expected a number, got 'abc'"
    ]


def test_no_lenient_coercion() -> None:
    text = '[proxy]\nmax_connections = "5"\nretry_after = 1.5\nvalidate_utf8 = "false"\n'
    assert errors_of(text) == [
        "proxy.max_connections: expected an integer, got '5'",
        "proxy.retry_after: expected an integer, got 1.5",
        "proxy.validate_utf8: expected true or false, got 'false'",
    ]


def test_table_where_a_list_belongs() -> None:
    assert errors_of('[servers]\nname = "a"\n') == ["servers: expected an array of tables, got a table"]


def test_string_where_a_list_belongs() -> None:
    assert errors_of(SERVER + 'url = "ws://h"\ntags = "eu"\n') == [
        "servers[0].tags: expected an array, got 'eu'"
    ]


def test_value_where_a_table_belongs() -> None:
    assert errors_of("proxy = 5\n") == ["proxy: expected a table, got 5"]


def test_bad_url_scheme() -> None:
    assert errors_of(SERVER + 'url = "http://127.0.0.1:8080"\n') == [
        "servers[0].url: not a ws:// or wss:// URL"
    ]


def test_url_without_host() -> None:
    assert errors_of(SERVER + 'url = "ws:///game"\n') == ["servers[0].url: missing host"]


def test_bad_listen_address() -> None:
    assert errors_of('[proxy]\nlisten = "9000"\n') == ["proxy.listen: expected host:port, got '9000'"]


def test_port_out_of_range() -> None:
    text = '[proxy]\nlisten = "0.0.0.0:70000"\n' + SERVER + 'url = "ws://h:65536"\n'
    assert errors_of(text) == [
        "proxy.listen: port must be 0..65535, got 70000",
        "servers[0].url: port must be 1..65535, got 65536",
    ]


def test_negative_timeout() -> None:
    assert errors_of("[proxy]\nclose_timeout = -1\nidle_timeout = -0.5\n") == [
        "proxy.idle_timeout: must be >= 0, got -0.5",
        "proxy.close_timeout: must be > 0, got -1.0",
    ]


def test_non_finite_timeout() -> None:
    assert errors_of("[proxy]\nconnect_timeout = inf\n") == [
        "proxy.connect_timeout: expected a finite number, got inf"
    ]


def test_capacity_zero() -> None:
    assert errors_of(SERVER + 'url = "ws://h"\ncapacity = 0\n') == [
        "servers[0].capacity: must be >= 1, got 0"
    ]


def test_bad_algorithm() -> None:
    assert errors_of('[balancer]\nalgorithm = "fastest"\n') == [
        "balancer.algorithm: must be one of least_connections, round_robin, random, "
        "weighted_round_robin, power_of_two"
    ]


def test_duplicate_server_names() -> None:
    text = "".join(
        f'[[servers]]\nname = "{name}"\nurl = "ws://127.0.0.1:{8080 + i}"\n'
        for i, name in enumerate(["game-server-1", "game-server-1", "x", "x"])
    )
    assert errors_of(text) == [
        "servers[1].name: duplicate server name 'game-server-1'",
        "servers[3].name: duplicate server name 'x'",
    ]


def test_bad_server_name_and_tag() -> None:
    text = '[[servers]]\nname = "a b"\nurl = "ws://h"\ntags = ["eu", ""]\n'
    assert errors_of(text) == [
        "servers[0].name: must not contain spaces, '/' or control characters, got 'a b'",
        "servers[0].tags[1]: must not be empty",
    ]


def test_missing_server_name_and_url() -> None:
    assert errors_of("[[servers]]\ncapacity = 5\n") == [
        "servers[0].name: missing required key",
        "servers[0].url: missing required key",
    ]


def test_invalid_toml_syntax() -> None:
    assert errors_of("[proxy\nlisten = 1\n") == [
        "atlas.toml: invalid TOML: Expected ']' at the end of a table declaration (at line 1, column 7)"
    ]


def test_unreadable_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.toml"
    with pytest.raises(ConfigError) as info:
        Config.from_file(missing)
    assert info.value.errors == (f"{missing}: cannot read: No such file or directory",)


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[proxy]\nlisten = "h\xe9:1"\n')
    with pytest.raises(ConfigError) as info:
        Config.from_file(path)
    assert info.value.errors == (f"{path}: invalid TOML: not UTF-8 (byte 19)",)


def test_syntax_error_in_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "atlas.toml"
    path.write_text("listen = \n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        Config.from_file(str(path))
    assert info.value.errors == (f"{path}: invalid TOML: Invalid value (at line 1, column 10)",)


def test_several_errors_are_all_reported() -> None:
    text = """\
bogus = 1

[proxy]
listen = "localhost"
max_connections = 0
bogus = 2

[logging]
level = "verbose"

[[servers]]
name = ""
url = "http://h"

[[servers]]
url = "ws://h"
weight = 0
"""
    assert errors_of(text) == [
        "proxy.listen: expected host:port, got 'localhost'",
        "proxy.max_connections: must be >= 1, got 0",
        "proxy.bogus: unknown key",
        "servers[0].name: must not be empty",
        "servers[0].url: not a ws:// or wss:// URL",
        "servers[1].name: missing required key",
        "servers[1].weight: must be >= 1, got 0",
        "logging.level: must be one of debug, info, warning, error",
        "bogus: unknown key",
    ]


# --------------------------------------------------------------------------------------------------
# Records built in code are validated too
# --------------------------------------------------------------------------------------------------


def test_records_validate_in_code() -> None:
    with pytest.raises(ValueError, match=r"must be >= 1, got 0"):
        ProxyConfig(max_connections=0)
    with pytest.raises(ValueError, match=r"expected host:port"):
        ProxyConfig(listen="9000")
    with pytest.raises(ValueError, match=r"not a ws:// or wss:// URL"):
        ServerConfig(name="a", url="http://h")
    with pytest.raises(ValueError, match=r"port must be 0\.\.65535, got 65536"):
        ListenAddress("h", 65536)
    with pytest.raises(ValueError, match=r"servers\[1\]\.name: duplicate server name 'a'"):
        Config(servers=(ServerConfig("a", "ws://h"), ServerConfig("a", "ws://i")))


def test_sequences_become_tuples() -> None:
    server = ServerConfig("a", "ws://h", tags=["x"])
    assert server.tags == ("x",)
    assert Config(servers=[server]).servers == (server,)
    with pytest.raises(TypeError, match="got a string"):
        ServerConfig("a", "ws://h", tags="x")


# --------------------------------------------------------------------------------------------------
# atlas init
# --------------------------------------------------------------------------------------------------


def test_write_default_config_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "atlas.toml"
    write_default_config(path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# ")
    assert Config.from_file(path) == Config.default()


def test_write_default_config_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "atlas.toml"
    path.write_text("# mine\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        write_default_config(path)
    assert info.value.errors == (f"{path}: exists (use --force)",)
    assert path.read_text(encoding="utf-8") == "# mine\n"
    write_default_config(os.fspath(path), force=True)
    assert Config.from_file(path) == Config.default()


def test_write_default_config_reports_unwritable_path(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "atlas.toml"
    with pytest.raises(ConfigError) as info:
        write_default_config(path)
    assert info.value.errors == (f"{path}: cannot write: No such file or directory",)


def test_names_allow_common_characters() -> None:
    for name in ["horizon-0-0-0", "eu_1.prod", "サーバー", string.digits]:
        assert _valid_name(name)


def test_low_watermark_above_high_watermark() -> None:
    assert errors_of("[transfer]\nlow_watermark = 0.9\nhigh_watermark = 0.5\n") == [
        "transfer: low_watermark (0.9) must be <= high_watermark (0.5)"
    ]


def test_skim_batch_interval_bounds() -> None:
    assert errors_of("[skim]\nbatch_interval = 2\n") == ["skim.batch_interval: must be <= 1 second, got 2.0"]
    assert errors_of("[skim]\nbatch_interval = -0.1\n") == ["skim.batch_interval: must be >= 0, got -0.1"]
    skim = Runtime.from_config(Config.from_toml("[skim]\nbatch_interval = 0\n", source="t")).skim
    assert skim is not None
    assert skim.batch_interval == 0.0

"""The client-facing TLS context (``wss://`` to Atlas), built once at start-up from ``[proxy] tls_*``.

The certificate chain and the key are read here, before anything listens, so a missing or unusable file
is one start-up line naming its key, never a failure per connection.
"""

from __future__ import annotations

import ssl
from typing import NoReturn

from atlas.config import ProxyConfig
from atlas.errors import StartupError

__all__ = ["server_ssl_context"]

_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def _read(key: str, path: str) -> bytes:
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise StartupError(f"proxy.{key}: cannot read {path}: {exc.strerror or exc}") from None


def server_ssl_context(config: ProxyConfig) -> ssl.SSLContext | None:
    """The server-side context of ``config`` (None without TLS); :class:`StartupError` if a file is unusable.

    ``ssl.create_default_context(Purpose.CLIENT_AUTH)`` with the chain loaded, ``tls_min_version`` as the
    floor and ALPN ``http/1.1`` (the WebSocket upgrade is HTTP/1.1).
    """
    if not config.tls:
        return None
    cert, key = config.tls_cert, config.tls_key
    if b"-----BEGIN CERTIFICATE-----" not in _read("tls_cert", cert):
        raise StartupError(f"proxy.tls_cert: {cert} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in _read("tls_key", key):
        raise StartupError(f"proxy.tls_key: {key} holds no PEM private key")

    def no_passphrase() -> NoReturn:
        # Without a callback OpenSSL would prompt on the terminal of a server.
        raise StartupError(f"proxy.tls_key: {key} is encrypted (a passphrase is not supported)")

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = _VERSIONS[config.tls_min_version]
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key, password=no_passphrase)
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise StartupError(
                f"proxy.tls_key: the key in {key} does not match the certificate in {cert}"
            ) from None
        reason = exc.reason or str(exc)
        raise StartupError(f"proxy.tls_cert: {cert} with {key}: unusable ({reason})") from None
    except OSError as exc:  # replaced or removed between the two reads
        raise StartupError(f"proxy.tls_cert: cannot load {cert}: {exc.strerror or exc}") from None
    return context

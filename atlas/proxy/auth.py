"""Token auth at the handshake: find a client's JWT, verify it, and name the player it speaks for.

:class:`TokenVerifier` is built once at start-up from the ``[auth]`` table (its key read and checked
then) and is pure afterwards: :meth:`TokenVerifier.verify` takes an :class:`UpgradeRequest` and returns it
with the verified player id and without the token's query parameter, or raises :class:`HandshakeError`
401 with a short reason that never quotes the token. The listener calls it only when ``[auth] enabled``.

The token comes from ``Authorization: Bearer <token>``, or else from the query parameter
``[auth] query_param``. That parameter is removed from the target forwarded to backends whichever way the
token came (a token in a URL ends up in backend access logs otherwise).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_to_bytes

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from atlas.config import AuthConfig
from atlas.errors import HandshakeError, StartupError
from atlas.proxy.handshake import UpgradeRequest

__all__ = ["TokenVerifier", "strip_query_param"]

_MAX_PLAYER_ID = 256
#: The curve each ECDSA algorithm signs with (RFC 7518 3.4).
_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}

#: pyjwt's failures, most specific first, as the reasons a client is told (never the token itself).
_REASONS: tuple[tuple[type[jwt.InvalidTokenError], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "token audience not accepted"),
    (jwt.InvalidIssuerError, "token issuer not accepted"),
    (jwt.InvalidAlgorithmError, "token algorithm not allowed"),
    (jwt.InvalidSignatureError, "token signature does not verify"),
    (jwt.InvalidIssuedAtError, "token issued-at time is invalid"),
    (jwt.exceptions.InvalidSubjectError, "token's 'sub' claim is not a string"),
    (jwt.DecodeError, "malformed token"),
)


def _reason(exc: jwt.InvalidTokenError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"token has no {exc.claim!r} claim"  # a name from the config, not from the token
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "invalid token"


def strip_query_param(target: bytes, name: bytes) -> tuple[bytes, bytes | None]:
    """``target`` without every ``name=...`` query parameter, and the first one's value (percent-decoded).

    ``/play?token=abc&room=1`` with ``token`` gives ``(b"/play?room=1", b"abc")``; a target with no such
    parameter is returned unchanged, with None.
    """
    path, question, query = target.partition(b"?")
    if not question:
        return target, None
    found: bytes | None = None
    kept = []
    for part in query.split(b"&"):
        key, _equals, value = part.partition(b"=")
        if key == name:
            if found is None:
                found = unquote_to_bytes(value)
            continue
        kept.append(part)
    if found is None:
        return target, None
    rest = b"&".join(kept)
    return (path + b"?" + rest if rest else path), found


def _load_public_key(config: AuthConfig) -> Any:
    """The public key of ``public_key_file``, checked against every configured algorithm."""
    path = config.public_key_file
    try:
        with open(path, "rb") as file:
            pem = file.read()
    except OSError as exc:
        raise StartupError(f"auth.public_key_file: cannot read {path}: {exc.strerror or exc}") from None
    try:
        key = load_pem_public_key(pem)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise StartupError(f"auth.public_key_file: {path} holds no PEM public key") from None
    for name in config.algorithms:
        if name[:2] in ("RS", "PS"):
            fits = isinstance(key, rsa.RSAPublicKey)
        else:
            fits = isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _CURVES[name]
        if not fits:
            raise StartupError(f"auth.public_key_file: the key in {path} cannot verify {name}")
    return key


class TokenVerifier:
    """Verifies the bearer tokens of upgrade requests against one ``[auth]`` table.

    Built once (:meth:`from_config`): the key, the decoder and its options are prepared here, so a
    handshake pays for the signature check and little else.
    """

    def __init__(self, config: AuthConfig, key: Any) -> None:
        """``key``: the HMAC secret, or the loaded public key."""
        self.config = config
        self.key = key
        require = [config.claim]
        require += ["iss"] if config.issuer else []
        require += ["aud"] if config.audience else []
        self._decoder = jwt.PyJWT({"require": require})
        self._algorithms = list(config.algorithms)
        self._issuer = config.issuer or None
        self._audience = config.audience or None
        self._query_param = config.query_param.encode("ascii")

    @classmethod
    def from_config(cls, config: AuthConfig) -> TokenVerifier:
        """The verifier of an enabled ``[auth]`` table; :class:`StartupError` if its key file is unusable."""
        public = any(not name.startswith("HS") for name in config.algorithms)
        key = _load_public_key(config) if public else config.secret
        return cls(config, key)

    def token_of(self, request: UpgradeRequest) -> tuple[str | None, bytes]:
        """The request's token (None if it has none) and its target without the token's query parameter."""
        target, from_query = request.target, None
        if self._query_param:
            target, from_query = strip_query_param(request.target, self._query_param)
        authorization = request.header(b"authorization")
        if authorization is not None:
            scheme, _space, credentials = authorization.strip().partition(b" ")
            if scheme.lower() == b"bearer" and credentials.strip():
                return credentials.strip().decode("latin-1"), target
        if from_query:
            return from_query.decode("latin-1"), target
        return None, target

    def verify(self, request: UpgradeRequest) -> UpgradeRequest:
        """``request`` with its verified ``player_id`` and its target cleaned; :class:`HandshakeError` 401."""
        token, target = self.token_of(request)
        if token is None:
            raise HandshakeError(401, "missing bearer token")
        try:
            claims = self._decoder.decode(
                token,
                self.key,
                algorithms=self._algorithms,
                issuer=self._issuer,
                audience=self._audience,
                leeway=self.config.leeway,
            )
        except jwt.InvalidTokenError as exc:
            raise HandshakeError(401, _reason(exc)) from None
        claim = self.config.claim
        player = claims.get(claim)
        if (
            not isinstance(player, str)
            or not 0 < len(player) <= _MAX_PLAYER_ID
            or not player.isprintable()
            or player != player.strip()
        ):
            raise HandshakeError(401, f"token's {claim!r} claim is not a usable player id")
        return UpgradeRequest(target, request.key, request.subprotocols, request.headers, player)

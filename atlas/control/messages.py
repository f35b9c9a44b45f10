"""The control protocol's messages (version 1), shared by Atlas and the game-server SDK.

Every message is one JSON object in one WebSocket text frame, tagged by its ``type`` field. The records
are msgspec ``Struct`` classes: encoding and decoding are one call each, and a message that does not fit
its record (a missing field, a wrong type, an unknown ``type``) is a :class:`ProtocolError` naming the
place. docs/protocol.md is the specification; this module is its executable form.

Naming: ``transfer`` is a transfer id, ``client`` a client id (the value of ``X-Atlas-Client-Id``),
``timeout_ms`` the time the receiver has left to answer (relative, so clocks need not agree).
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

__all__ = [
    "PROTOCOL_VERSION",
    "SUPPORTED_VERSIONS",
    "AtlasMessage",
    "Hello",
    "Load",
    "ProtocolError",
    "ServerMessage",
    "TransferAbort",
    "TransferAccepted",
    "TransferBegin",
    "TransferCommit",
    "TransferCommitted",
    "TransferComplete",
    "TransferNotice",
    "TransferPrepare",
    "TransferReady",
    "TransferRefused",
    "TransferReject",
    "TransferRequest",
    "TransferState",
    "Welcome",
    "decode_from_atlas",
    "decode_from_server",
    "encode",
]

PROTOCOL_VERSION: Final = 1
SUPPORTED_VERSIONS: Final = (1,)

Reason = Literal["load_balancing", "maintenance", "region_boundary", "failover", "admin", "client_request"]
"""Why a transfer happens."""


class ProtocolError(Exception):
    """A control message could not be decoded; the text says what and where."""


class _Message(msgspec.Struct, tag_field="type", forbid_unknown_fields=False, kw_only=True):
    """Base of every control message (unknown fields are ignored, for forward compatibility)."""


# -- Atlas -> server ------------------------------------------------------------------------------


class Hello(_Message, tag="hello"):
    """Atlas opens the control channel: the versions it speaks and who it is."""

    versions: list[int]
    node: str


class TransferNotice(_Message, tag="transfer.notice"):
    """To the source: advance notice that ``client`` is about to move to ``target``."""

    transfer: str
    client: str
    target: str
    reason: Reason
    timeout_ms: int


class TransferPrepare(_Message, tag="transfer.prepare"):
    """To the target: ``client`` is coming from ``source``; answer ``transfer.ready`` or ``.reject``."""

    transfer: str
    client: str
    source: str
    reason: Reason
    timeout_ms: int


class TransferBegin(_Message, tag="transfer.begin"):
    """To the source: the cut has begun.

    ``delivered`` client messages reached you on this client's link and no more will; once you have
    processed all of them, answer ``transfer.state``.
    """

    transfer: str
    client: str
    delivered: int
    timeout_ms: int


class TransferCommit(_Message, tag="transfer.commit"):
    """To the target: the player's ``state`` from the source; answer ``transfer.committed`` to own it."""

    transfer: str
    client: str
    state: Any
    timeout_ms: int


class TransferComplete(_Message, tag="transfer.complete"):
    """To the source: the target owns the client now; forget the player (its link closes)."""

    transfer: str
    client: str


class TransferAccepted(_Message, tag="transfer.accepted"):
    """Answer to a server's ``transfer.request``: the transfer ``transfer`` has started."""

    request: str
    transfer: str


class TransferRefused(_Message, tag="transfer.refused"):
    """Answer to a server's ``transfer.request``: no transfer, and why."""

    request: str
    reason: str


class TransferAbort(_Message, tag="transfer.abort"):
    """To both: the transfer is rolled back; the source keeps (or resumes) the client."""

    transfer: str
    client: str
    reason: str


# -- server -> Atlas ------------------------------------------------------------------------------


class Welcome(_Message, tag="welcome"):
    """The server's answer to ``hello``: the version chosen and its name."""

    version: int
    server: str
    capabilities: list[str] = []


class Load(_Message, tag="load"):
    """A load report, sent whenever convenient (every few seconds)."""

    players: int
    capacity: int
    tick_ms: float = 0.0
    accepting: bool = True


class TransferReady(_Message, tag="transfer.ready"):
    """From the target: ready to receive the client."""

    transfer: str


class TransferReject(_Message, tag="transfer.reject"):
    """From either server: refuse the transfer (Atlas rolls back)."""

    transfer: str
    reason: str


class TransferState(_Message, tag="transfer.state"):
    """From the source: the player's state and ``sent``, the messages it sent the client on its link.

    After this message the source sends the client nothing more on that link.
    """

    transfer: str
    state: Any
    sent: int


class TransferRequest(_Message, tag="transfer.request"):
    """From a server: please move ``client`` (one of its players) to the server named ``target``.

    ``request`` is the server's own id for the request; Atlas answers ``transfer.accepted`` (then runs
    the transfer as usual) or ``transfer.refused``.
    """

    request: str
    client: str
    target: str
    reason: Reason = "client_request"


class TransferCommitted(_Message, tag="transfer.committed"):
    """From the target: it owns the client; its messages may flow."""

    transfer: str


AtlasMessage = (
    Hello
    | TransferNotice
    | TransferPrepare
    | TransferBegin
    | TransferCommit
    | TransferComplete
    | TransferAbort
    | TransferAccepted
    | TransferRefused
)
"""Any message Atlas sends."""

ServerMessage = (
    Welcome
    | Load
    | TransferReady
    | TransferReject
    | TransferState
    | TransferCommitted
    | TransferAbort
    | TransferRequest
)
"""Any message a game server sends."""

_encoder = msgspec.json.Encoder()
_from_server: msgspec.json.Decoder[ServerMessage] = msgspec.json.Decoder(ServerMessage)
_from_atlas: msgspec.json.Decoder[AtlasMessage] = msgspec.json.Decoder(AtlasMessage)


def encode(message: AtlasMessage | ServerMessage) -> str:
    """One message as the JSON text of one WebSocket text frame."""
    return _encoder.encode(message).decode("utf-8")


def decode_from_server(text: str | bytes) -> ServerMessage:
    """Decode a message a game server sent; :class:`ProtocolError` if it is not one."""
    try:
        return _from_server.decode(text)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ProtocolError(str(exc)) from None


def decode_from_atlas(text: str | bytes) -> AtlasMessage:
    """Decode a message Atlas sent; :class:`ProtocolError` if it is not one."""
    try:
        return _from_atlas.decode(text)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise ProtocolError(str(exc)) from None

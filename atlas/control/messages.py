"""The control protocol's messages (version 1), shared by Atlas and the game-server SDK.

Every message is one JSON object in one WebSocket text frame, tagged by its ``type`` field. The records
are msgspec ``Struct`` classes: encoding and decoding are one call each, and a message that does not fit
its record (a missing field, a wrong type, an unknown ``type``) is a :class:`ProtocolError` naming the
place. docs/protocol.md is the specification; this module is its executable form.

Naming: ``transfer`` is a transfer id, ``client`` a client id (the value of ``X-Atlas-Client-Id``),
``timeout_ms`` the time the receiver has left to answer (relative, so clocks need not agree).

The ``relay.*`` and ``object.*`` messages carry game data between servers through Atlas (servers that
announce the ``relay`` capability): ``payload`` and ``state`` are any JSON value, passed on unchanged,
``point`` is a world position ``[x, y, z]``, ``handoff`` an id for one object handoff.
"""

from __future__ import annotations

from typing import Any, Final, Literal

import msgspec

__all__ = [
    "PROTOCOL_VERSION",
    "RELAY_CAPABILITY",
    "SUPPORTED_VERSIONS",
    "AtlasMessage",
    "Hello",
    "Load",
    "ObjectAccept",
    "ObjectAck",
    "ObjectHandoff",
    "ObjectOffer",
    "ObjectReject",
    "ObjectRejected",
    "ObjectWithdrawn",
    "Point",
    "ProtocolError",
    "RelayClient",
    "RelayKind",
    "RelayMessage",
    "RelayRegion",
    "RelaySend",
    "RelayUndeliverable",
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

RELAY_CAPABILITY: Final = "relay"
"""The ``welcome`` capability of a server that takes ``relay.message`` and ``object.offer``."""

Reason = Literal["load_balancing", "maintenance", "region_boundary", "failover", "admin", "client_request"]
"""Why a transfer happens."""

RelayKind = Literal["server", "region", "client"]
"""How a relayed message was addressed: to a server by name, to a region's owner, to a client."""

Point = tuple[float, float, float]
"""A position in the game world, ``[x, y, z]`` on the wire."""


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


class RelayMessage(_Message, tag="relay.message", omit_defaults=True):
    """To a server: a message another server addressed to it (``kind`` says how).

    ``point`` is set for ``kind="region"``, ``client`` for ``kind="client"`` (deliver it to that player;
    ``hops`` counts how often it was passed on already). ``relay`` is the sender's id for the message.
    """

    from_server: str
    kind: RelayKind
    payload: Any
    client: str | None = None
    point: Point | None = None
    relay: str | None = None
    hops: int = 0


class RelayUndeliverable(_Message, tag="relay.undeliverable", omit_defaults=True):
    """To a sender: its relayed message reached nobody, and why; its address and payload come back."""

    kind: RelayKind
    reason: str
    payload: Any
    to_server: str | None = None
    point: Point | None = None
    client: str | None = None
    relay: str | None = None


class ObjectOffer(_Message, tag="object.offer", omit_defaults=True):
    """To the target: take over ``object`` from ``from_server``; answer ``object.accept`` or ``.reject``.

    ``handoff`` is Atlas's id for this offer (not the source's); ``point`` is where the object went, if
    the source gave one.
    """

    handoff: str
    object: str
    from_server: str
    state: Any
    timeout_ms: int
    point: Point | None = None


class ObjectAck(_Message, tag="object.ack", omit_defaults=True):
    """To the source: ``to_server`` accepted the object; it is no longer the source's."""

    handoff: str
    to_server: str


class ObjectRejected(_Message, tag="object.rejected", omit_defaults=True):
    """To the source: the object did not move (refused, timed out, undeliverable); the source keeps it."""

    handoff: str
    reason: str


class ObjectWithdrawn(_Message, tag="object.withdrawn", omit_defaults=True):
    """To the target: an offer is void (too late, or the source was lost); drop the object if you took it."""

    handoff: str
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


class RelaySend(_Message, tag="relay.send", omit_defaults=True):
    """From a server: relay ``payload`` to the server named ``to_server``."""

    to_server: str
    payload: Any
    relay: str | None = None


class RelayRegion(_Message, tag="relay.region", omit_defaults=True):
    """From a server: relay ``payload`` to the owner of the region that holds ``point``."""

    point: Point
    payload: Any
    relay: str | None = None


class RelayClient(_Message, tag="relay.client", omit_defaults=True):
    """From a server: relay ``payload`` to the client ``client``, on whichever server it is.

    A server that got a ``relay.message`` for a player that is no longer (or not yet quite) its own
    passes it on with ``from_server`` (the original sender) and ``hops`` (one more than it got).
    """

    client: str
    payload: Any
    relay: str | None = None
    from_server: str | None = None
    hops: int = 0


class ObjectHandoff(_Message, tag="object.handoff", omit_defaults=True):
    """From the source: hand ``object`` (with its ``state``) to the owner of ``point``, or to ``to_server``.

    Exactly one of ``point`` and ``to_server``. ``handoff`` is the source's id for it; Atlas answers
    ``object.ack`` or ``object.rejected`` with that id. The source keeps the object until then.
    """

    handoff: str
    object: str
    state: Any
    point: Point | None = None
    to_server: str | None = None


class ObjectAccept(_Message, tag="object.accept", omit_defaults=True):
    """From the target: it took the object of the offer ``handoff``; it is the target's now."""

    handoff: str


class ObjectReject(_Message, tag="object.reject", omit_defaults=True):
    """From the target: it refuses the offer ``handoff``; the source keeps the object."""

    handoff: str
    reason: str


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
    | RelayMessage
    | RelayUndeliverable
    | ObjectOffer
    | ObjectAck
    | ObjectRejected
    | ObjectWithdrawn
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
    | RelaySend
    | RelayRegion
    | RelayClient
    | ObjectHandoff
    | ObjectAccept
    | ObjectReject
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

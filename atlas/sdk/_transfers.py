"""The game server's side of a transfer: one task per transfer, as the source or as the target.

Theory of operation
-------------------
The control channel's reader (``_control.py``) starts one task per transfer in the channel's nursery:
:func:`run_source` on ``transfer.notice``, :func:`run_target` on ``transfer.prepare``. Each task reads
like the protocol (docs/protocol.md): it calls the game's hooks, answers Atlas, and waits for Atlas's
next step message, which the reader puts in the transfer's one-slot-per-step inbox (only messages that
the :class:`~atlas.sdk._handoff.Handoff` phase accepts get there). Every wait has a deadline: Atlas's
``timeout_ms`` for the steps it times, and ``handoff_timeout`` for the waits between Atlas's steps.

A task runs in the :class:`trio.CancelScope` of its record (``Transfer.scope``, also handed back through
``task_status.started``); the reader starts it with ``start_soon``, so a burst of steps is read without
waiting for tasks to start, and an abort that comes before the task runs cancels the scope beforehand.
Everything that ends a transfer early cancels that scope after recording why: ``transfer.abort`` from
Atlas (:meth:`Transfer.abort_by_atlas`), the player's link closing, the control channel closing
(:meth:`Transfer.fail`). Two data-plane facts count as Atlas's word too, since the control channel and the
data link are separate connections and either may be read first: on the source, a client message past
``transfer.begin``'s ``delivered`` means Atlas rolled back (:meth:`Outgoing.message_beyond_cut`), and the
link closed with 1000 ``transferred`` after the state went out means Atlas switched the client
(:meth:`Outgoing.link_closed`). A step that goes wrong inside the task raises :class:`Refused` instead,
which says whether Atlas must be told (``transfer.reject`` while preparing, ``transfer.abort`` later).
Either way the task then rolls back outside the cancelled scope:

* source: the player's queued sends are flushed in order (``Player._release``), and
  ``on_transfer_aborted`` is called if the game had agreed;
* target: the parked link is closed (``transfer aborted``); the player, if ``on_transfer_in`` already
  ran, gets ``on_disconnect(player, "transfer_aborted")`` from its link session, and
  ``on_transfer_in_aborted`` is called if the game had agreed.

Past COMMITTED (target) or COMPLETED (source) nothing rolls back: a target that installed the player
keeps it even if ``transfer.committed`` cannot be sent, because its data link decides (Atlas closes
the link if it rolled back).
"""

from __future__ import annotations

import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import attrs
import msgspec
import trio

from atlas.control.messages import (
    AtlasMessage,
    TransferAbort,
    TransferBegin,
    TransferCommit,
    TransferCommitted,
    TransferComplete,
    TransferNotice,
    TransferPrepare,
    TransferReady,
    TransferReject,
    TransferState,
    encode,
)
from atlas.sdk._channel import ChannelGone, ControlChannel
from atlas.sdk._handoff import Handoff, Phase, TransferInfo
from atlas.sdk._player import TRANSFER_ABORTED, TRANSFERRED, Player, PlayerDisconnected

if TYPE_CHECKING:
    from atlas.sdk._server import GameServer

__all__ = ["Incoming", "Outgoing", "Refused", "Transfer", "Transfers", "run_source", "run_target"]

logger = logging.getLogger("atlas.sdk")

#: Seconds a rollback hook (``on_transfer_aborted``, ``on_transfer_in_aborted``) may take.
HOOK_CLEANUP_TIMEOUT = 5.0
#: How many ended transfers are remembered, to answer late steps about them with their reason.
_REMEMBERED = 4096
# Room for each step message Atlas may send in one phase, plus one duplicate.
_INBOX_SIZE = 2

_Step = TypeVar("_Step", TransferBegin, TransferComplete, TransferCommit)
_T = TypeVar("_T")


class Refused(Exception):
    """A step of a transfer failed on this server; ``answer`` is how Atlas is told (None: not at all)."""

    def __init__(self, reason: str, *, answer: Literal["reject", "abort"] | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.answer = answer


@attrs.define(eq=False)
class Transfer:
    """What both sides keep about one transfer in progress."""

    info: TransferInfo
    channel: ControlChannel
    handoff: Handoff
    scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    agreed: bool = False
    """``on_transfer_prepare`` said yes (so the abort hooks are due on rollback)."""
    atlas_abort: str | None = None
    """Atlas's reason, when it sent ``transfer.abort``."""
    local_abort: str | None = None
    """Why this server gave up, when something outside the task ended it (link or channel closed)."""
    ended: trio.Event = attrs.field(factory=trio.Event)
    """Set when the transfer's task is done (rolled back, completed or committed)."""
    _inbox_send: trio.MemorySendChannel[AtlasMessage] = attrs.field(init=False)
    _inbox_receive: trio.MemoryReceiveChannel[AtlasMessage] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._inbox_send, self._inbox_receive = trio.open_memory_channel[AtlasMessage](_INBOX_SIZE)

    def deliver(self, message: AtlasMessage) -> None:
        """Hand a step message from Atlas to the transfer's task (never blocks; a flood is dropped)."""
        try:
            self._inbox_send.send_nowait(message)
        except trio.WouldBlock:
            logger.warning("transfer %s: dropping a repeated %s", self.info.id, type(message).__name__)

    @property
    def ending(self) -> bool:
        """Whether the transfer is over or rolling back (Atlas aborted it, or this server gave up)."""
        return self.handoff.done or self.atlas_abort is not None or self.local_abort is not None

    def abort_by_atlas(self, reason: str) -> None:
        """Atlas rolled the transfer back."""
        if self.atlas_abort is None and self.local_abort is None:
            self.atlas_abort = reason
        self.scope.cancel()

    def fail(self, reason: str) -> None:
        """Something outside the task ends the transfer here (no effect once it has ended)."""
        if self.handoff.done:
            return
        if self.atlas_abort is None and self.local_abort is None:
            self.local_abort = reason
        self.scope.cancel()

    async def next_step(self, kind: type[_Step], guard: float) -> _Step:
        """Wait up to ``guard`` seconds for Atlas's next step message of type ``kind``."""
        with trio.move_on_after(guard):
            while True:
                message = await self._inbox_receive.receive()
                if isinstance(message, kind):
                    return message
                logger.warning("transfer %s: ignoring an untimely %s", self.info.id, type(message).__name__)
        tag = kind.__struct_config__.tag
        raise Refused(f"no {tag} from Atlas within {guard:g} s", answer="abort")


@attrs.define(eq=False)
class Outgoing(Transfer):
    """A transfer whose source is this server: ``player`` is leaving."""

    player: Player = attrs.field(kw_only=True)
    delivered: int | None = None
    """``transfer.begin``'s count, once it came: no more client messages arrive unless Atlas rolled back."""
    previous: Outgoing | None = attrs.field(default=None, kw_only=True)
    """The player's previous transfer, still rolling back when this one was announced: this one waits
    for it to end (its queued sends go out first) before it takes part."""

    def link_closed(self, *, transferred: bool) -> None:
        """The player's link closed; ``transferred``: with 1000 ``transferred``, from Atlas.

        Atlas closes the source's link that way only once the target owns the client, so after the
        state went out (HANDED_OFF) that completes the transfer: its ``transfer.complete``, on the
        control channel, may simply not have been read yet. Anything else ends the transfer here.
        """
        if transferred and self.handoff.phase is Phase.HANDED_OFF:
            self.deliver(TransferComplete(transfer=self.info.id, client=self.info.client))
        else:
            self.fail("the client's link closed")

    def message_beyond_cut(self) -> bool:
        """Whether the player's next message lies past ``transfer.begin``'s count; if so, roll back.

        Atlas relays nothing past ``delivered`` unless it rolled the transfer back (docs/protocol.md,
        ``transfer.begin``), so such a message *is* the rollback, whether or not its
        ``transfer.abort`` has been read yet (it may never come: Atlas bounds the time it spends
        telling servers). Called by the player's reader before it hands the message on.
        """
        if self.delivered is None or self.player.received < self.delivered or self.ending:
            return False
        self.abort_by_atlas(
            f"Atlas relayed message {self.delivered + 1} after transfer.begin said {self.delivered}"
        )
        return True


@attrs.define(eq=False)
class Incoming(Transfer):
    """A transfer whose target is this server; ``player`` appears when Atlas's data link arrives."""

    player: Player | None = None
    linked: trio.Event = attrs.field(factory=trio.Event)

    def attach(self, player: Player) -> bool:
        """The data link for this transfer arrived (parked); False if the transfer has already ended."""
        if self.handoff.done or self.player is not None:
            return False
        self.player = player
        self.linked.set()
        return True


@attrs.define
class Transfers:
    """The transfers in progress on one server, by transfer id, and a memory of recent endings."""

    outgoing: dict[str, Outgoing] = attrs.field(factory=dict)
    incoming: dict[str, Incoming] = attrs.field(factory=dict)
    completed: int = 0
    committed: int = 0
    aborted: int = 0
    _ended: collections.OrderedDict[str, str] = attrs.field(factory=collections.OrderedDict)

    def get(self, transfer: str) -> Outgoing | Incoming | None:
        """The transfer in progress with id ``transfer``, if any."""
        return self.outgoing.get(transfer) or self.incoming.get(transfer)

    def ended(self, transfer: str) -> str | None:
        """How a recent transfer ended (``"completed: ..."`` or ``"aborted: ..."``), if remembered."""
        return self._ended.get(transfer)

    def forget(self, record: Transfer, outcome: str) -> None:
        """Take an ended transfer out of the registry, remembering ``outcome``."""
        self.outgoing.pop(record.info.id, None)
        self.incoming.pop(record.info.id, None)
        self.remember(record.info.id, outcome)

    def remember(self, transfer: str, outcome: str) -> None:
        """Remember how ``transfer`` ended, to answer Atlas's late steps about it."""
        self._ended[transfer] = outcome
        self._ended.move_to_end(transfer)
        while len(self._ended) > _REMEMBERED:
            self._ended.popitem(last=False)

    def fail_channel(self, channel: ControlChannel, reason: str) -> None:
        """End every transfer that came through ``channel`` (it closed): each rolls back."""
        for record in [*self.outgoing.values(), *self.incoming.values()]:
            if record.channel is channel:
                record.fail(reason)


# --------------------------------------------------------------------------------------------------
# Helpers


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


async def _call_hook(
    name: str, hook: Callable[..., Awaitable[_T]], *args: Any, answer: Literal["reject", "abort"]
) -> _T:
    """Run a game hook; an exception from it becomes a :class:`Refused` (and is logged with its traceback)."""
    try:
        return await hook(*args)
    except Exception as exc:
        logger.exception("%s raised", name)
        raise Refused(f"{name} failed: {exc!r}", answer=answer) from None


async def _tell(record: Transfer, refusal: Refused | None, reason: str) -> None:
    """Tell Atlas this server gave up on the transfer (best effort: a closed channel is ignored)."""
    if record.atlas_abort is not None:
        return  # Atlas started the rollback; it needs no answer
    answer = refusal.answer if refusal is not None else ("abort" if record.local_abort else None)
    info = record.info
    message: TransferReject | TransferAbort
    if answer == "reject":
        message = TransferReject(transfer=info.id, reason=reason)
    elif answer == "abort":
        message = TransferAbort(transfer=info.id, client=info.client, reason=reason)
    else:
        return
    with contextlib.suppress(ChannelGone):
        await record.channel.send(message)


async def _cleanup_hook(name: str, hook: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Run a rollback hook, bounded; its failure is logged and goes no further."""
    with trio.move_on_after(HOOK_CLEANUP_TIMEOUT) as scope:
        try:
            await hook(*args)
        except Exception:
            logger.exception("%s raised", name)
    if scope.cancelled_caught:
        logger.warning("%s took over %g s and was cancelled", name, HOOK_CLEANUP_TIMEOUT)


def _why_ended(record: Transfer, refusal: Refused | None) -> str:
    if record.atlas_abort is not None:
        return record.atlas_abort
    if refusal is not None:
        return refusal.reason
    return record.local_abort or "cancelled"


# --------------------------------------------------------------------------------------------------
# Source


async def run_source(
    server: GameServer,
    out: Outgoing,
    notice: TransferNotice,
    *,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run this server's side of a transfer whose source it is, from ``transfer.notice`` to the end."""
    refusal: Refused | None = None
    player = out.player
    try:
        with out.scope:
            task_status.started(out.scope)
            try:
                await _source_steps(server, out)
            except Refused as exc:
                refusal = exc
        if out.handoff.phase is Phase.COMPLETED:
            dropped = player._drop_held()
            player._end(TRANSFERRED)
            server._transfers.completed += 1
            server._transfers.forget(out, "completed")
            logger.info(
                "%s: player %s transferred to %s (transfer %s; %d queued sends dropped)",
                server.name,
                player.id,
                out.info.peer,
                out.info.id,
                dropped,
            )
            return
        reason = _why_ended(out, refusal)
        out.handoff.advance(Phase.ABORTED)
        server._transfers.aborted += 1
        server._transfers.forget(out, f"aborted: {reason}")
        logger.info(
            "%s: transfer %s of player %s rolled back: %s", server.name, out.info.id, player.id, reason
        )
        await _tell(out, refusal, reason)
        if player.connected:
            try:
                await player._release()
            except PlayerDisconnected:
                return
            if out.agreed:
                await _cleanup_hook("on_transfer_aborted", server.on_transfer_aborted, player)
    finally:
        if player._transfer is out:
            player._transfer = None
        out.ended.set()


async def _source_steps(server: GameServer, out: Outgoing) -> None:
    info = out.info
    player = out.player
    previous, out.previous = out.previous, None
    if previous is not None:
        # Atlas rolled the previous transfer back and started this one at once: let that rollback
        # finish (the player's queued sends go out, in order) before this one holds anything.
        with trio.move_on_after(info.timeout):
            await previous.ended.wait()
        if not previous.ended.is_set():
            why = f"transfer {previous.info.id} of this player is still rolling back"
            raise Refused(why, answer="reject")
    with trio.move_on_after(info.timeout) as deciding:
        agreed = await _call_hook("on_transfer_prepare", server.on_transfer_prepare, info, answer="reject")
    if deciding.cancelled_caught:
        raise Refused(f"on_transfer_prepare did not answer within {_ms(info.timeout)} ms", answer="reject")
    if not agreed:
        raise Refused(f"{server.name} refused to hand over the player", answer="reject")
    out.agreed = True
    out.handoff.advance(Phase.NOTIFIED)

    begin = await out.next_step(TransferBegin, server.handoff_timeout)
    out.delivered = begin.delivered
    out.handoff.advance(Phase.DRAINING)
    with trio.move_on_after(begin.timeout_ms / 1000) as step:
        # Atlas stopped relaying after `delivered` messages; the player's reader processes them in
        # order, so once `received` reaches it the player is exactly where the client's stream was cut.
        await player._wait_received(begin.delivered)
        if not player.connected:
            raise Refused("the client's link closed", answer="abort")
        if player.received != begin.delivered:
            raise Refused(
                f"{player.received} messages processed but Atlas delivered {begin.delivered}", answer="abort"
            )
        sent = await player._hold()
        state = await _call_hook("on_transfer_out", server.on_transfer_out, player, answer="abort")
        try:
            text = encode(TransferState(transfer=info.id, state=state, sent=sent))
        except (TypeError, ValueError, msgspec.EncodeError) as exc:
            raise Refused(f"the state from on_transfer_out is not JSON: {exc}", answer="abort") from None
    if step.cancelled_caught:
        raise Refused(
            f"transfer.begin not answered within {begin.timeout_ms} ms "
            f"({player.received} of {begin.delivered} messages processed)",
            answer="abort",
        )
    out.handoff.advance(Phase.HANDED_OFF)
    try:
        await out.channel.send_text(text)
    except ChannelGone as exc:
        raise Refused(str(exc), answer=None) from None

    await out.next_step(TransferComplete, server.handoff_timeout)
    out.handoff.advance(Phase.COMPLETED)


# --------------------------------------------------------------------------------------------------
# Target


async def run_target(
    server: GameServer,
    inc: Incoming,
    prepare: TransferPrepare,
    *,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run this server's side of a transfer whose target it is, from ``transfer.prepare`` to the end."""
    try:
        await _run_target(server, inc, prepare, task_status)
    finally:
        inc.ended.set()


async def _run_target(
    server: GameServer,
    inc: Incoming,
    prepare: TransferPrepare,
    task_status: trio.TaskStatus[trio.CancelScope],
) -> None:
    refusal: Refused | None = None
    player: Player | None = None
    with inc.scope:
        task_status.started(inc.scope)
        try:
            player = await _target_steps(server, inc, prepare)
            # No checkpoint since on_transfer_in returned: an abort cannot slip in between.
            inc.handoff.advance(Phase.COMMITTED)
        except Refused as exc:
            refusal = exc
    if player is not None and inc.handoff.phase is Phase.COMMITTED:
        server._transfers.committed += 1
        server._transfers.forget(inc, "committed")
        try:
            await inc.channel.send(TransferCommitted(transfer=inc.info.id))
        except ChannelGone as exc:
            # Atlas may or may not have it; the player stays, and its link decides: Atlas closes the
            # link if it rolled back.
            logger.warning("%s: transfer %s: transfer.committed not sent: %s", server.name, inc.info.id, exc)
        player._admit()
        logger.info(
            "%s: player %s transferred in from %s (transfer %s)",
            server.name,
            player.id,
            inc.info.peer,
            inc.info.id,
        )
        with contextlib.suppress(PlayerDisconnected):
            await player._release()
        return
    reason = _why_ended(inc, refusal)
    inc.handoff.advance(Phase.ABORTED)
    server._transfers.aborted += 1
    server._transfers.forget(inc, f"aborted: {reason}")
    logger.info(
        "%s: incoming transfer %s of client %s dropped: %s", server.name, inc.info.id, inc.info.client, reason
    )
    if inc.player is not None:
        inc.player._end(TRANSFER_ABORTED)
    await _tell(inc, refusal, reason)
    if inc.agreed:
        await _cleanup_hook("on_transfer_in_aborted", server.on_transfer_in_aborted, inc.info, reason)


async def _target_steps(server: GameServer, inc: Incoming, prepare: TransferPrepare) -> Player:
    info = inc.info
    leaving = server.players.get(info.client)
    if leaving is not None and leaving._transfer is not None:
        # The client's player here is handing off to another server, and Atlas brings the client back:
        # so that transfer is over at Atlas, only this server has not read its end yet (the control
        # channel and the link are separate connections). Let it end first (bounded).
        with trio.move_on_after(info.timeout):
            await leaving._transfer.ended.wait()
    unwelcome = server._why_not_admit(info.client)
    if unwelcome is not None:
        raise Refused(unwelcome, answer="reject")
    with trio.move_on_after(info.timeout) as deciding:
        agreed = await _call_hook("on_transfer_prepare", server.on_transfer_prepare, info, answer="reject")
    if deciding.cancelled_caught:
        raise Refused(f"on_transfer_prepare did not answer within {_ms(info.timeout)} ms", answer="reject")
    if not agreed:
        raise Refused(f"{server.name} refused to take the player", answer="reject")
    inc.agreed = True
    # READY before the answer goes out: Atlas opens the data link as soon as it reads it.
    inc.handoff.advance(Phase.READY)
    try:
        await inc.channel.send(TransferReady(transfer=info.id))
    except ChannelGone as exc:
        raise Refused(str(exc), answer=None) from None

    commit = await inc.next_step(TransferCommit, server.handoff_timeout)
    if commit.client != info.client:
        raise Refused(f"transfer.commit names client {commit.client}, not {info.client}", answer="abort")
    inc.handoff.advance(Phase.COMMITTING)
    player: Player | None = None
    with trio.move_on_after(commit.timeout_ms / 1000) as step:
        await inc.linked.wait()
        player = inc.player
        assert player is not None  # linked is set together with player
        if not player.connected:
            raise Refused("the transfer's data link closed", answer="abort")
        if server._has_connected(info.client):  # it connected some other way since transfer.prepare
            raise Refused(f"client {info.client} is already connected to {server.name}", answer="abort")
        server._install(player)
        await _call_hook("on_transfer_in", server.on_transfer_in, player, commit.state, answer="abort")
    if step.cancelled_caught or player is None:
        what = "on_transfer_in" if player is not None else "the data link"
        raise Refused(
            f"transfer.commit not done within {commit.timeout_ms} ms (waiting for {what})", answer="abort"
        )
    return player

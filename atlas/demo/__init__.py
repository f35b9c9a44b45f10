"""Demo game servers to put behind Atlas, and an interactive WebSocket client.

- :func:`serve_echo_server`: echoes every message (the Autobahn conformance backend; plain WebSocket).
- :func:`serve_chat_server`: a tiny chat game server with ``/who`` and ``/server`` (plain WebSocket).
- :class:`EchoGame`, :class:`ChatGame`: the same two games on the SDK (``atlas.sdk``), whose players
  keep a nickname and a message count and can ``/move <server>`` (rules in ``atlas.demo.rules``).
- :func:`serve_demo_cluster`: ``game-server-1`` (an :class:`EchoGame`) plus :class:`ChatGame` rooms:
  the default backends.
- :func:`run_client`: what ``python -m atlas client ws://...`` runs.
"""

from atlas.demo.client import run_client
from atlas.demo.games import ChatGame, DemoGame, EchoGame
from atlas.demo.servers import (
    ChatOutput,
    ChatRoom,
    serve_chat_server,
    serve_demo_cluster,
    serve_echo_server,
)

__all__ = [
    "ChatGame",
    "ChatOutput",
    "ChatRoom",
    "DemoGame",
    "EchoGame",
    "run_client",
    "serve_chat_server",
    "serve_demo_cluster",
    "serve_echo_server",
]

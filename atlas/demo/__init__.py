"""Demo game servers to put behind Atlas, and an interactive WebSocket client.

- :func:`serve_echo_server`: echoes every message (the Autobahn conformance backend).
- :func:`serve_chat_server`: a tiny chat game server with ``/who`` and ``/server``.
- :func:`serve_demo_cluster`: ``game-server-1`` (echo) plus chat servers: the default backends.
- :func:`run_client`: what ``python -m atlas client ws://...`` runs.
"""

from atlas.demo.client import run_client
from atlas.demo.servers import (
    ChatOutput,
    ChatRoom,
    serve_chat_server,
    serve_demo_cluster,
    serve_echo_server,
)

__all__ = [
    "ChatOutput",
    "ChatRoom",
    "run_client",
    "serve_chat_server",
    "serve_demo_cluster",
    "serve_echo_server",
]

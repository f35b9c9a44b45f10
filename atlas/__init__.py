"""Atlas: a WebSocket proxy and load balancer for game-server clusters, on trio."""

__version__ = "0.1.0"
__all__ = ["__version__"]

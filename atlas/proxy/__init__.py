"""The data plane: handshakes, the frame-level relay, client sessions and the listener."""

"""The ops plane: metrics, the admin HTTP API and Horizon-compatible registration."""

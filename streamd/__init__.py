"""streamd: a real-time video analytics daemon (live streams in, results out through Redis)."""

__version__ = "0.1.0"

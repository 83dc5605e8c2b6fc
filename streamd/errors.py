"""Named exceptions. Each carries a reason a user can act on."""


class StreamdError(Exception):
    """Base of every error streamd raises on purpose."""


class ConfigError(StreamdError):
    """The configuration is invalid; `key` names the offending path (e.g. ``streams.0.url``)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class SourceError(StreamdError):
    """A source could not be opened or read. `permanent` errors are not retried (bad reference)."""

    def __init__(self, message: str, *, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


class FrameDecodeError(StreamdError):
    """A frame pushed into a Redis stream could not be decoded."""


class StageError(StreamdError):
    """A pipeline stage failed on a batch."""

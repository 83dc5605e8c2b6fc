"""Named exceptions. Each carries a reason a user can act on."""


class StreamdError(Exception):
    """Base of every error streamd raises on purpose."""


class ConfigError(StreamdError):
    """The configuration is invalid; `key` names the offending path (e.g. ``streams.0.url``)."""

    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class UsageError(ConfigError):
    """A command-line option is invalid (`key` names it): a usage error (exit 2), not a configuration's."""


class SourceError(StreamdError):
    """A source could not be opened or read. `permanent` errors are not retried (bad reference). `code` is the
    failure class an operator can act on (one of `REASON_CODES`), shown next to the message in state events, the
    API and logs."""

    def __init__(self, message: str, *, permanent: bool = False, code: str = "source_error"):
        super().__init__(message)
        self.permanent = permanent
        self.code = code


# failure classes of a source (SourceError.code)
REASON_CODES = {
    "source_error": "any other failure of the source",
    "invalid_reference": "the stream reference cannot be used (scheme, syntax, key)",
    "egress_refused": "the egress policy refused an address (the message names its class: loopback, private ...)",
    "unresolvable": "the host name does not resolve",
    "unreachable": "the connection was refused or reset",
    "timeout": "no answer or no data within the configured time",
    "http_status": "an HTTP request answered with an error status",
    "too_many_redirects": "more redirects than egress.max_redirects",
    "too_large": "a playlist, segment or response exceeded its size limit (a job's media of unknown length: "
                 "more frames than jobs.unknown_length_cap_s allows, and no end)",
    "source_changed": "HTTP media changed between connections (sized then chunked, another ETag / "
                      "Last-Modified, or another body after a cut): it cannot be resumed",
    "request_rate": "the stream made more requests per second than egress.requests_per_s allows",
    "playlist_loop": "a playlist refers back to itself",
    "invalid_playlist": "a playlist that cannot be parsed or has no media",
    "not_media": "the input is not a media file FFmpeg can read",
    "no_video": "the input has no video stream",
    "not_found": "the file or resource does not exist (or cannot be read)",
    "corrupt_input": "too much of the input cannot be decoded",
    "ended": "a recording or file reached its end",
    "stalled": "no frame for stall_timeout_s",
    "disconnected": "a live source closed the connection",
    "paused": "the stream is paused (paused: true): kept, not run",
}


class FrameDecodeError(StreamdError):
    """A frame pushed into a Redis stream could not be decoded."""


class ImageTooLarge(FrameDecodeError):
    """An image whose header says it is over a pixel budget (nothing of it was decoded)."""

    def __init__(self, message: str, width: int, height: int, max_pixels: int):
        super().__init__(message)
        self.width, self.height, self.max_pixels = width, height, max_pixels


class StageError(StreamdError):
    """A pipeline stage failed on a batch."""

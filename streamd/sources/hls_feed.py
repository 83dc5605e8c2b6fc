"""The HLS decoder thread's input (streamd/sources/hls.py): fetched segments, handed over through a bounded queue,
read by PyAV as one byte stream per run of MPEG-TS segments, with the segment each byte came from known."""

from __future__ import annotations

import io
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from streamd.errors import SourceError

END = object()  # the hand-off queue's last item at a clean end of the playlist
FLUSH_IDLE_S = 0.2  # no new segment for this long: the decoder's held-back frames are flushed out


@dataclass(slots=True)
class Segment:
    msn: int
    data: bytes
    discontinuity: bool
    pdt: float | None  # program date time of the segment's start (epoch seconds)
    start: int = 0  # its first byte's offset in the run of segments it is read in
    packets: int = 0  # video packets demuxed from it


class Feed(io.RawIOBase):
    """The decoder thread's input: segments from the hand-off queue as one byte stream for a run of MPEG-TS
    segments (EOF at a discontinuity, at a non-TS segment, at the end, or after FLUSH_IDLE_S without a new
    segment), or one segment alone otherwise. Knows which segment each byte offset came from."""

    def __init__(self, handoff: queue.Queue[Any], stop: threading.Event):
        self._handoff = handoff
        self._stop = stop
        self._next: Any = None  # an item taken that belongs to the next run
        self._buf = memoryview(b"")
        self._off = 0
        self._segs: list[Segment] = []  # fed in this run, not yet settled
        self._eof = False
        self.final: Any = None  # END or a SourceError: nothing comes after it
        self.ts = False
        self.discontinuity = False
        self.count = 0  # segments fed, ever
        self.last_t = time.monotonic()

    def readable(self) -> bool:
        return True

    def _take(self, wait: bool) -> Any:
        if self._next is not None:
            item, self._next = self._next, None
            return item
        t0 = time.monotonic()
        while not self._stop.is_set():
            try:
                return self._handoff.get(timeout=0.05)
            except queue.Empty:
                if not wait and time.monotonic() - t0 >= FLUSH_IDLE_S:
                    return None  # caught up with the live edge: this run ends, its held-back frames go out
        return None

    def begin(self) -> bool:
        """Start a run with the next segment; False when the feed is finished or stopping."""
        if self.final is not None:
            return False
        item = self._take(wait=True)
        if not isinstance(item, Segment):
            self.final = item
            return False
        self._off, self._segs, self._eof = 0, [], False
        self.ts = item.data[:1] == b"\x47"
        self.discontinuity = item.discontinuity
        self._feed(item)
        return True

    def _feed(self, seg: Segment) -> None:
        seg.start, seg.packets = self._off, 0
        self._segs.append(seg)
        self._buf = memoryview(seg.data)
        self.count += 1
        self.last_t = time.monotonic()

    def readinto(self, b: Any) -> int:
        while not len(self._buf):
            if self._eof or not self.ts or self._stop.is_set():
                return 0
            item = self._take(wait=False)
            if isinstance(item, Segment) and not item.discontinuity and item.data[:1] == b"\x47":
                self._feed(item)
                continue
            self._eof = True
            if isinstance(item, Segment):
                self._next = item
            elif item is not None:
                self.final = item
            return 0
        k = min(len(b), len(self._buf))
        b[:k] = self._buf[:k]
        self._buf = self._buf[k:]
        self._off += k
        return k

    def whole(self) -> io.BytesIO:
        """A non-TS run's one segment, as a seekable file (an MP4 demuxer may seek)."""
        data = bytes(self._buf)
        self.drain()
        self._eof = True
        return io.BytesIO(data)

    def drain(self) -> None:
        """Skip what is left of the current segment (the demuxer gave up on it)."""
        self._off += len(self._buf)
        self._buf = memoryview(b"")

    def locate(self, pos: int | None) -> tuple[Segment | None, bool, list[Segment]]:
        """The segment a packet at byte `pos` came from, whether it is that segment's first packet, and the
        segments before it (now settled: the demuxer is past them)."""
        if pos is None or pos < 0 or not self._segs:
            return (self._segs[0] if self._segs else None), False, []
        i = len(self._segs) - 1
        while i > 0 and self._segs[i].start > pos:
            i -= 1
        done, self._segs = self._segs[:i], self._segs[i:]
        seg = self._segs[0]
        return seg, seg.packets == 0, done

    def settle_all(self) -> list[Segment]:
        done, self._segs = self._segs, []
        return done


def aes128_decrypt(data: bytes, secret: bytes, iv_hex: str | None, msn: int) -> bytes:
    """An AES-128 (CBC, PKCS#7) segment's plain bytes; the IV from the key tag, or the media sequence number."""
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    if iv_hex:
        iv = bytes.fromhex(iv_hex[2:] if iv_hex.lower().startswith("0x") else iv_hex).rjust(16, b"\0")
    else:
        iv = msn.to_bytes(16, "big")
    if len(data) % 16:
        raise SourceError("an AES-128 segment is not a multiple of 16 bytes", code="corrupt_input")
    dec = Cipher(algorithms.AES(secret), modes.CBC(iv)).decryptor()
    plain = dec.update(data) + dec.finalize()
    unpad = padding.PKCS7(128).unpadder()
    try:
        return unpad.update(plain) + unpad.finalize()
    except ValueError:
        raise SourceError("an AES-128 segment does not decrypt (wrong key?)", code="corrupt_input") from None

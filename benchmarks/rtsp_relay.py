"""CPU of the RTSP relay's reply parser (streamd/sources/rtsp_relay.py) per MB of interleaved media.

    .venv/bin/python benchmarks/rtsp_relay.py [--mb 11] [--read 65536] [--frame 1400]

Feeds `$`-framed RTP packets of `--frame` bytes through `RtspRelay._replies` in reads of `--read` bytes (no sockets:
the parser alone, as it runs on the event loop for every RTSP stream) and prints CPU ms per MB and the share of a core
a camera of a given bitrate costs.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from streamd.sources.rtsp_relay import RtspRelay  # noqa: E402


class _Reader:
    def __init__(self, data: bytes, size: int):
        self.data, self.size, self.i = data, size, 0

    async def read(self, n: int) -> bytes:
        chunk = self.data[self.i:self.i + min(n, self.size)]
        self.i += len(chunk)
        return chunk


class _Writer:
    def write(self, b: bytes) -> None:
        pass

    async def drain(self) -> None:
        pass


async def measure(mb: float, read: int, frame: int) -> float:
    one = b"$\x00" + frame.to_bytes(2, "big") + b"x" * frame
    data = one * max(1, int(mb * 1e6 / len(one)))
    relay = RtspRelay.__new__(RtspRelay)
    relay.bytes_down = 0
    t0 = time.process_time()
    await relay._replies(_Reader(data, read), _Writer())
    assert relay.bytes_down == len(data)
    return (time.process_time() - t0) / (len(data) / 1e6) * 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=11.0)
    ap.add_argument("--read", type=int, default=65536, help="bytes per socket read")
    ap.add_argument("--frame", type=int, default=1400, help="bytes per RTP packet")
    a = ap.parse_args()
    ms = asyncio.run(measure(a.mb, a.read, a.frame))
    print(f"reads of {a.read} B, packets of {a.frame} B: {ms:.2f} ms CPU per MB; a 4 Mbit/s camera "
          f"{ms * 0.5 / 10:.3f} % of a core, 64 of them {ms * 0.5 * 64 / 10:.2f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())

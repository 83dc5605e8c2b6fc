"""VLM stage benchmarks, both sides in the same run, same tiny random-weight Qwen2.5-VL (built offline):

(a) `transformers` backend through the daemon: 4 live streams (files played in real time, 20 fps sampled: 80 frames/s, more
    than the model can answer), VLM asked about every frame it has room for; answers/s with cross-stream batching
    (`max_batch` 4) against one frame per `generate` call (`max_batch` 1). Ratio = batched / unbatched.
(b) `openai` backend against a real `transformers serve`: the backend's `answer()` (resize, JPEG, retries,
    endpoint pick, concurrency limit) at concurrency 4 against the `openai` client called directly at the same
    concurrency with the same JPEG payload. Ratio = backend / direct (target >= 0.95).

    .venv/bin/python benchmarks/vlm.py [--seconds 20] [--requests 64]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from streamd.config import parse_config  # noqa: E402
from streamd.log import setup_logging  # noqa: E402
from streamd.redis_server import ManagedRedis  # noqa: E402
from streamd.samples import make_pan_clip  # noqa: E402
from streamd.testing.daemon import running  # noqa: E402
from streamd.testing.openai import TransformersServe  # noqa: E402
from streamd.testing.tiny_vlm import build_tiny_qwen25vl  # noqa: E402

PIXELS = 112 * 112
TOKENS = 16


async def daemon_answers(model: str, clip: Path, redis_url: str, max_batch: int, seconds: float) -> dict:
    stage = {"type": "vlm", "backend": "transformers", "model": model, "device": "cpu", "every_s": 0,
             "generate_batch": max_batch, "max_wait_ms": 10, "max_in_flight": 8, "max_tokens": TOKENS,
             "max_pixels": PIXELS, "staleness_s": 30}
    cfg = parse_config({
        "redis": {"url": redis_url},
        "pipelines": {"v": {"stages": [stage]}},
        "streams": [{"id": f"s{i}", "url": str(clip), "fps": 20.0, "playback": "realtime", "loop": True,
                     "pipeline": "v"} for i in range(4)],
    }, environ={})
    async with running(cfg) as d:
        vlm = d.pipelines["v"].stages[0]
        await d.pipelines["v"].ready.wait()
        await asyncio.sleep(3.0)  # warm-up: first generate calls, decoders started
        a0, t0 = vlm.answered, time.perf_counter()
        await asyncio.sleep(seconds)
        answered, wall = vlm.answered - a0, time.perf_counter() - t0
        sizes = list(vlm.backend.batch_sizes)
    return {"answers_s": answered / wall, "batch_mean": statistics.fmean(sizes) if sizes else 0.0,
            "failed": vlm.failed}


async def openai_overhead(url: str, model: str, requests: int, concurrency: int) -> tuple[float, float]:
    import openai

    from streamd.stages.vlm.base import VlmRequest
    from streamd.stages.vlm.openai import EndpointConfig, OpenAIBackend, RetryConfig, jpeg_data_uri

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (84, 150, 3), dtype=np.uint8)  # already within the pixel budget
    uri = jpeg_data_uri(image, 85)
    client = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
    backend = OpenAIBackend(model, [EndpointConfig(url=url, max_concurrency=concurrency)], RetryConfig(), 60.0)

    async def direct() -> None:
        await client.chat.completions.create(model=model, max_tokens=TOKENS, temperature=0.0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": "What is in this image?"}]}])

    async def ours() -> None:
        await backend.answer(VlmRequest([image], "What is in this image?", None, TOKENS, 0.0))

    async def rate(call) -> float:
        todo = iter(range(requests))

        async def worker() -> None:
            for _ in todo:
                await call()

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return requests / (time.perf_counter() - t0)

    await rate(direct)  # warm-up
    await rate(ours)
    d1, o1 = await rate(direct), await rate(ours)  # interleaved, twice; best of each
    o2, d2 = await rate(ours), await rate(direct)
    await client.close()
    await backend.aclose()
    return max(o1, o2), max(d1, d2)


async def amain(a: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="streamd-vlm-bench-"))
    model = str(build_tiny_qwen25vl(tmp / "tiny-qwen25vl"))
    clip = make_pan_clip(tmp / "pan.mp4", seconds=4, fps=30, size=(640, 360))
    import torch

    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)
    print(f"model: tiny random-weight Qwen2.5-VL ({model}); {TOKENS} new tokens; images {PIXELS} px; "
          f"device cpu; torch threads {torch.get_num_threads()}; {os.cpu_count()} CPU cores", flush=True)
    srv = await asyncio.to_thread(ManagedRedis(tmp / "redis").start)
    try:
        rows = {}
        for mb in (1, 4, 1, 4):  # interleaved; best of two each
            r = await daemon_answers(model, clip, srv.url, mb, a.seconds)
            if mb not in rows or r["answers_s"] > rows[mb]["answers_s"]:
                rows[mb] = r
            print(f"  transformers backend, max_batch {mb}: {r['answers_s']:.2f} answers/s, "
                  f"mean batch {r['batch_mean']:.2f}", flush=True)
    finally:
        srv.stop()
    ratio_a = rows[4]["answers_s"] / rows[1]["answers_s"]
    ts = await asyncio.to_thread(TransformersServe(model, str(tmp / "hf"), threads=a.serve_threads).start)
    try:
        ours, direct = await openai_overhead(ts.url, model, a.requests, 4)
    finally:
        ts.stop()
    print("\n| benchmark | streamd | baseline | ratio |\n|---|--:|--:|--:|")
    print(f"| (a) transformers backend, 4 live streams: batched (max_batch 4, mean batch "
          f"{rows[4]['batch_mean']:.2f}) vs one frame per generate | {rows[4]['answers_s']:.2f} answers/s | "
          f"{rows[1]['answers_s']:.2f} answers/s | **{ratio_a:.2f}** |")
    print(f"| (b) openai backend vs openai client, transformers serve, concurrency 4, {a.requests} requests | "
          f"{ours:.2f} req/s | {direct:.2f} req/s | **{ours / direct:.2f}** (target >= 0.95) |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=15.0, help="measured time per daemon run")
    ap.add_argument("--requests", type=int, default=64, help="requests per openai run")
    ap.add_argument("--serve-threads", type=int, default=1, help="OMP threads of transformers serve")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch threads in process (default 1: on a shared 2-core box more threads than free cores "
                         "make generate times swing several-fold; 0 = torch's default)")
    setup_logging("warning", "console")
    asyncio.run(amain(ap.parse_args()))


if __name__ == "__main__":
    main()

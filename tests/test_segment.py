"""The segment stage: SAM 2 mask tracking, online, built from its config with random weights at a small image size
(no hub here), on real frames (a pan over a real photo). The masks of random weights mean nothing; what is checked
is the plumbing: prompts, memory, state per stream, visibility, records, and sameness with the sam2 package's own
video predictor."""

from __future__ import annotations

import asyncio
import json
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("sam2", reason="the segment stage needs the sam2 package (scripts/bootstrap.sh installs it)")

from streamd.config import StageConfig  # noqa: E402
from streamd.errors import ConfigError, StageError  # noqa: E402
from streamd.frames import Frame, Work  # noqa: E402
from streamd.models import ModelManager  # noqa: E402
from streamd.samples import load_photo, make_pan_clip, pan_frames  # noqa: E402
from streamd.stages import StageContext, build_stage  # noqa: E402
from streamd.stages.segment import ObjectLimit, ObjectNotFound, Segment  # noqa: E402
from streamd.stages.segment.visibility import State, Visibility  # noqa: E402
from streamd.testing.media import push_frames  # noqa: E402
from conftest import OPER, PERSON, READ, api_cfg, events, h, make_config, results, running, until  # noqa: E402

SIZE = 128  # the model's input size in these tests (SAM 2.1's is 1024)
W, H = 320, 180
BOX_A, BOX_B = [150.0, 10.0, 250.0, 175.0], [20.0, 40.0, 90.0, 160.0]


@pytest.fixture(scope="module")
async def models():
    import torch

    torch.manual_seed(0)  # every stage of this module shares the one loaded model (same identity)
    m = ModelManager()
    yield m
    await m.aclose()


@pytest.fixture(scope="module")
def frames() -> list[np.ndarray]:
    return list(pan_frames(load_photo(), 240, 10, (W, H)))


class Events(list):
    def __call__(self, stream_id: str, kind: str, fields: dict[str, Any] | None = None) -> None:
        self.append((stream_id, kind, fields or {}))

    def kinds(self, stream_id: str | None = None) -> list[str]:
        return [k for s, k, _ in self if stream_id is None or s == stream_id]


async def make_stage(models: ModelManager, events: Events | None = None, **opts: Any) -> Segment:
    cfg = StageConfig(**{"type": "segment", "checkpoint": "random", "image_size": SIZE, "device": "cpu", **opts})
    st = build_stage(cfg, "pipelines.seg.stages.2")
    assert isinstance(st, Segment)
    st.bind(StageContext(models=models, events=events if events is not None else Events()))
    await st.setup()
    return st


def work(sid: str, seq: int, image: np.ndarray, tracks: list[tuple[int, list[float]]] = (),
         discontinuity: bool = False) -> Work:
    f = Frame(sid, seq, seq / 10, 1_700_000_000 + seq / 10, image, discontinuity=discontinuity)
    trs = [{"track_id": tid, "label": "person", "box": box} for tid, box in tracks]
    return Work(f, outputs={"track": {"tracker": "bytetrack", "tracks": trs}})


def decode(rle: dict[str, Any]) -> np.ndarray:
    """COCO uncompressed RLE (column-major, zeros first) back to a boolean mask."""
    h, w = rle["size"]
    flat = np.zeros(h * w, bool)
    pos, val = 0, False
    for n in rle["counts"]:
        flat[pos:pos + n] = val
        pos, val = pos + n, not val
    assert pos == h * w
    return flat.reshape((w, h)).T


def objs(w: Work) -> list[dict[str, Any]]:
    return w.outputs["segment"]["objects"]


# -- visibility on scores -----------------------------------------------------------------------------------------
def test_visibility_states_from_scores():
    v = Visibility(visible_from=0.5, lost_after_s=1.0)
    seen = [(v.update(s, t), v.state) for s, t in [(0.9, 0.0), (0.6, 0.1), (0.2, 0.2), (0.1, 0.7), (0.8, 0.9),
                                                   (0.4, 1.0), (0.3, 1.5), (0.45, 1.99), (0.49, 2.0), (0.95, 2.1)]]
    assert seen == [(None, State.VISIBLE), (None, State.VISIBLE), ("mask_occluded", State.OCCLUDED),
                    (None, State.OCCLUDED), ("mask_reappeared", State.VISIBLE),  # 0.5 s hidden: not lost
                    ("mask_occluded", State.OCCLUDED), (None, State.OCCLUDED), (None, State.OCCLUDED),
                    ("mask_lost", State.LOST),  # hidden since 1.0: 1.0 s at 2.0
                    (None, State.LOST)]  # lost stays lost
    v = Visibility(0.5, 1.0)
    assert v.update(0.5, 0.0) is None and v.state is State.VISIBLE  # the threshold itself is visible
    assert v.update(0.1, 5.0) == "mask_occluded"
    assert v.update(0.1, 4.0) is None and v.state is State.OCCLUDED  # a clock going back counts no time
    assert v.update(0.1, 6.0) == "mask_lost"


# -- the engine against the sam2 package's own predictor ----------------------------------------------------------
def test_engine_matches_the_sam2_video_predictor_frame_by_frame(tmp_path: Path, frames: list[np.ndarray]):
    """Two objects prompted by box on frame 0, followed over 20 frames: the engine (objects batched, memory
    bounded) gives the masks SAM2VideoPredictor.propagate_in_video gives, frame by frame."""
    import torch
    from PIL import Image

    from streamd.stages.segment.engine import FrameJob, ObjectStep, Sam2Engine
    from streamd.stages.segment.memory import Prompt, TrackedObject
    from streamd.stages.segment.model import build

    n = 20
    for i, img in enumerate(frames[:n]):  # the predictor reads JPEGs: both read the same decoded pixels
        Image.fromarray(img).save(tmp_path / f"{i:05d}.jpg", quality=95)
    images = [np.asarray(Image.open(tmp_path / f"{i:05d}.jpg").convert("RGB")) for i in range(n)]
    torch.manual_seed(0)
    model = build("sam2.1-hiera-tiny", "random", "cpu", SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm, and the hole filling it skips without its CUDA kernel
        state = model.init_state(str(tmp_path))
        for k, box in enumerate([BOX_A, BOX_B]):
            model.add_new_points_or_box(state, 0, k + 1, box=box)
        ref = {fi: (m[:, 0] > 0).numpy() for fi, _, m in model.propagate_in_video(state)}
    engine = Sam2Engine(model, "sam2.1-hiera-tiny", "cpu")
    objects = [TrackedObject(k + 1, Visibility(0.5, 1.0)) for k in range(2)]
    for t, img in enumerate(images):
        steps = [ObjectStep(o, Prompt.from_box(b) if t == 0 else None) for o, b in zip(objects, [BOX_A, BOX_B])]
        (out,) = engine.step([FrameJob(t, img, steps)], memory_frames=6)
        masks = engine.frame_masks([o.low_res for o in out.objects], H, W)
        for k, mask in enumerate(masks):
            assert ref[t][k].any()  # seed 0: the random model finds an object (an empty mask would prove less)
            iou = (mask & ref[t][k]).sum() / (mask | ref[t][k]).sum()
            assert iou > 0.999, (t, k, iou)
        spatial_from, pointers_from = engine.window(t + 1, 6)
        for o in objects:
            o.prune(spatial_from, pointers_from, 4)
    for o in objects:  # what the predictor keeps of frames 0..19 per object: all 20; here 1 + 15 pointers
        assert o.counts() == {"cond_frames": 1, "memory_frames": 6, "pointer_frames": 15}


# -- the stage ----------------------------------------------------------------------------------------------------
async def test_a_track_start_prompts_an_object_whose_mask_follows_every_frame(models, frames):
    ev = Events()
    st = await make_stage(models, ev)
    done = []
    for i in range(12):  # the track is there on frames 0-2 only: the mask goes on from SAM 2's memory
        w = work("cam", i, frames[i], [(7, BOX_A)] if i < 3 else [])
        await st.process([w])
        done.append(w)
    for i, w in enumerate(done):
        (o,) = objs(w)
        assert o["object_id"] == 1 and o["track_id"] == 7 and o["label"] == "person"
        assert o["prompted"] is (i == 0) and o["state"] == "visible" and 0 <= o["score"] <= 1
        mask = decode(o["mask"])
        assert mask.shape == (H, W) and int(mask.sum()) == o["area"] > 0
        ys, xs = np.nonzero(mask)
        assert o["box"] == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert o["box_norm"] == pytest.approx([o["box"][0] / W, o["box"][1] / H, o["box"][2] / W, o["box"][3] / H],
                                              abs=1e-4)
    assert done[-1].outputs["segment"]["memory"] == {"objects": 1, "cond_frames": 1, "memory_frames": 6,
                                                     "pointer_frames": 11, "bytes": st.memory("cam")["bytes"]}
    assert "mask_refused" not in ev.kinds()
    await st.teardown()


async def test_reassociated_track_reprompts_and_refused_tracks_are_told_once(models, frames):
    ev = Events()
    st = await make_stage(models, ev, max_objects=1, reprompt_iou=0.0)
    prompted = []
    for i in range(6):  # track 1 on 0-1, missing on 2-3, back on 4-5 (re-associated); track 2 never fits
        tracks = [(1, BOX_A)] if i in (0, 1, 4, 5) else []
        w = work("cam", i, frames[i], tracks + [(2, BOX_B)])
        await st.process([w])
        prompted.append([o["prompted"] for o in objs(w)])
    assert prompted == [[True], [False], [False], [False], [True], [False]]
    refused = [f for s, k, f in ev if k == "mask_refused"]
    assert [f["track_id"] for f in refused] == [2] and "max_objects" in refused[0]["reason"]


async def test_objects_of_two_streams_are_independent(models, frames):
    """Frames of two streams in one batch (batched passes) give stream a's masks as stream a alone gives them;
    object ids and memory are per stream."""
    alone, both = await make_stage(models), await make_stage(models)
    a_alone, a_both, b_both = [], [], []
    for i in range(8):
        wa = work("a", i, frames[i], [(1, BOX_A)] if i == 0 else [])
        await alone.process([wa])
        a_alone.append(objs(wa))
    for i in range(0, 8, 2):  # two frames of each stream per batch: two rounds, each one pass for both streams
        ws = [work("a", i, frames[i], [(1, BOX_A)] if i == 0 else []),
              work("b", i, frames[100 + i], [(5, BOX_B), (6, BOX_A)] if i == 0 else []),
              work("a", i + 1, frames[i + 1]), work("b", i + 1, frames[101 + i])]
        await both.process(ws)
        a_both += [objs(ws[0]), objs(ws[2])]
        b_both += [objs(ws[1]), objs(ws[3])]
    for x, y in zip(a_alone, a_both):
        (ox,), (oy,) = x, y
        mx, my = decode(ox["mask"]), decode(oy["mask"])
        assert (mx & my).sum() / max(1, (mx | my).sum()) > 0.999
        assert oy["object_id"] == 1 and abs(ox["score"] - oy["score"]) < 1e-3
    assert [[o["object_id"] for o in x] for x in b_both] == [[1, 2]] * 8  # ids count per stream
    assert [o["track_id"] for o in b_both[0]] == [5, 6]
    assert both.memory("a")["objects"] == 1 and both.memory("b")["objects"] == 2
    assert both.memory("b")["bytes"] == 2 * both.memory("a")["bytes"]


async def test_on_two_cores_a_pass_of_two_streams_runs_as_two_single_threaded_halves(models, frames):
    """On a CPU of 2 cores, frames of several streams go as two half passes at once, each on a thread of its own at
    one torch thread (no OpenMP pool of its own): two single-threaded passes beat one two-threaded pass there
    (benchmarks/RESULTS.md, issue 15). One stream's frame stays one pass at the executor's threads. That the masks
    are the same as without the split: test_objects_of_two_streams_are_independent."""
    import torch

    from streamd.models.executors import device_executor

    st = await make_stage(models, track_source=None)
    async with st.model.use() as engine:
        pass
    if not engine._halves:
        await st.teardown()
        pytest.skip(f"{os.cpu_count()} cores: passes are not split")
    seen: list[tuple[str, int, list[int]]] = []

    def step(jobs: list[Any], memory_frames: int) -> list[Any]:
        seen.append((threading.current_thread().name, torch.get_num_threads(), [j.t for j in jobs]))
        return type(engine).step(engine, jobs, memory_frames)  # the real pass, only watched

    engine.step = step
    try:
        for sid in ("a", "b", "c"):
            st.add_prompt(sid, {"box": BOX_A})
        await st.process([work("a", 0, frames[0]), work("b", 0, frames[50]), work("c", 0, frames[100])])
        three = sorted(seen)
        seen.clear()
        await st.process([work("a", 1, frames[1])])
    finally:
        del engine.step
        await st.teardown()
    assert [(n.split("-")[0], k, len(t)) for n, k, t in three] == [("sam2", 1, 2), ("sam2", 1, 1)], three
    assert three[0][0] != three[1][0]
    (one,) = seen
    assert one[0].startswith("model-cpu") and one[1] == device_executor("cpu").torch_threads >= 2, one


async def test_on_the_cpu_the_masks_are_sized_on_the_forward_passes_thread(models, frames):
    """On the CPU every torch call of the stage runs on the device's executor thread: each thread that runs a
    parallel torch operation gets an OpenMP pool of its own, and a second pool on the same cores made every forward
    pass ~20 % slower (benchmarks/RESULTS.md, issue 15). The masks (torch's interpolation at the frame's size) are
    sized there, after the pass; no masks thread of the stage's own."""
    from streamd.models.executors import device_executor

    st = await make_stage(models, track_source=None)
    async with st.model.use() as engine:
        pass
    device_thread = device_executor("cpu").submit(lambda: threading.current_thread().name).result()
    threads: list[str] = []

    def sizing(low_res: list[Any], height: int, width: int) -> np.ndarray:
        threads.append(threading.current_thread().name)
        return type(engine).frame_masks(engine, low_res, height, width)  # the real sizing, only watched

    engine.frame_masks = sizing
    try:
        st.add_prompt("a", {"box": BOX_A})
        ws = [work("a", i, frames[i]) for i in range(3)]
        for w in ws:
            await st.process([w])
    finally:
        del engine.frame_masks
        await st.teardown()
    assert [len(objs(w)) for w in ws] == [1, 1, 1] and decode(objs(ws[-1])[0]["mask"]).shape == (H, W)
    assert threads == [device_thread] * 3
    assert not [t.name for t in threading.enumerate() if t.name.startswith("segment-masks")]


THREADS_SCRIPT = r"""
import asyncio, json, sys, threading, time
import torch
from streamd.config import StageConfig
from streamd.frames import Frame, Work
from streamd.models import ModelManager
from streamd.samples import load_photo, pan_frames
from streamd.stages import StageContext, build_stage
from streamd.stages.lanes import Lane
from streamd.stages.segment.engine import Sam2Engine

default = torch.get_num_threads()  # a fresh process: torch's own count
seen = {"sam2": [], "lanes": []}
step, detect = Sam2Engine.step, Lane._detect

def watched_step(self, *a, **kw):
    seen["sam2"].append(torch.get_num_threads())
    return step(self, *a, **kw)

def watched_detect(self, *a, **kw):
    seen["lanes"].append(torch.get_num_threads())
    return detect(self, *a, **kw)

Sam2Engine.step, Lane._detect = watched_step, watched_detect

async def main():
    models = ModelManager()
    ctx = StageContext(models=models)
    seg = build_stage(StageConfig(type="segment", checkpoint="random", image_size=128, device="cpu",
                                  track_source=None), "pipelines.p.stages.1")
    det = build_stage(StageConfig(type="detect", model="yolo11n.yaml", imgsz=160, device="cpu", runtime="torch",
                                  lanes=2), "pipelines.p.stages.0")
    for st in (seg, det):
        st.bind(ctx)
        await st.setup()
    frames = list(pan_frames(load_photo(), 6, 10, (320, 180)))
    seg.add_prompt("a", {"box": [150.0, 10.0, 250.0, 175.0]})
    w = lambda i: Work(Frame("a", i, i / 10, time.time(), frames[i]))
    await seg.process([w(0)])  # before any detector
    await det.process([w(1), w(2)])  # the detector's set-up: Ultralytics' select_device on the device's thread
    for i in (3, 4):
        await seg.process([w(i)])
    await det.process([w(5)])
    await seg.teardown()
    await det.teardown()
    await models.aclose()

asyncio.run(main())
from ultralytics.utils import NUM_THREADS
print("RESULT " + json.dumps({"default": default, "ultralytics": NUM_THREADS, **seen}))
"""


def test_sam2_keeps_its_torch_threads_after_a_cpu_detector_was_set_up():
    """Ultralytics' select_device (its predictor's set-up, on the device's executor thread, the thread of SAM 2's
    passes) sets torch's intra-op threads to cores - 1: on 2 cores SAM 2 then ran at one thread, half its rate
    (benchmarks/RESULTS.md, issue 15). SAM 2's passes run at torch's own count before and after a detector was set
    up; the detector's lanes keep Ultralytics' count in their threads. In a fresh process: torch's count is the
    process's, whatever other tests did to it."""
    import subprocess
    import sys

    root = str(Path(__file__).resolve().parents[1])
    r = subprocess.run([sys.executable, "-c", THREADS_SCRIPT], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": root}, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    seen = json.loads(next(x for x in r.stdout.splitlines() if x.startswith("RESULT "))[len("RESULT "):])
    if seen["default"] == seen["ultralytics"]:
        pytest.skip(f"torch's count here ({seen['default']}) is Ultralytics' too: nothing to tell apart")
    assert seen["sam2"] == [seen["default"]] * 3, seen
    assert seen["lanes"] and set(seen["lanes"]) == {seen["ultralytics"]}, seen


async def test_memory_bank_stays_bounded_over_hundreds_of_frames(models, frames):
    """200 frames, two objects, a re-prompt from drift every 10 frames (reprompt_iou 1: every mask 'drifts'): the
    stored memories never pass their bounds and the bytes held stay flat once the bank is full."""
    st = await make_stage(models, memory_frames=3, max_cond_frames=2, reprompt_iou=1.0, reprompt_cooldown_frames=10)
    sizes = []
    for i in range(200):
        w = work("long", i, frames[i % len(frames)], [(1, BOX_A), (2, BOX_B)])
        await st.process([w])
        mem = w.outputs["segment"]["memory"]
        assert mem["objects"] == 2 and mem["cond_frames"] <= 2 * 2 and mem["memory_frames"] <= 2 * 3
        assert mem["pointer_frames"] <= 2 * 15
        sizes.append(mem["bytes"])
    assert mem["cond_frames"] == 4 and mem["memory_frames"] == 6  # full: the newest two prompts, three frames
    assert max(sizes[50:]) == max(sizes[20:50])  # flat once full
    per_object = st._streams["long"].objects[1]
    assert len(per_object.recent) <= 15 and len(per_object.cond) == 2 and min(per_object.cond) >= 180


async def test_discontinuity_resets_the_stream_and_removal_frees_it(models, frames):
    from streamd.pipeline import Pipeline  # noqa: F401 - the pipeline calls reset_stream on such a frame

    ev = Events()
    st = await make_stage(models, ev)
    for i in range(4):
        await st.process([work("cam", i, frames[i], [(1, BOX_A)] if i == 0 else [])])
    assert st.memory("cam")["objects"] == 1
    st.reset_stream("cam")  # what Pipeline._stage_loop does for a frame with discontinuity=True
    assert st.memory("cam") == {"objects": 0, "cond_frames": 0, "memory_frames": 0, "pointer_frames": 0, "bytes": 0}
    assert [(k, f["reason"]) for s, k, f in ev if k == "mask_lost"] == [("mask_lost", "reset")]
    w = work("cam", 4, frames[4], [(2, BOX_B)], discontinuity=True)
    await st.process([w])
    (o,) = objs(w)
    assert o["object_id"] == 2 and o["track_id"] == 2 and o["prompted"]  # ids go on counting
    assert st._streams["cam"].t == 0  # the memory's time axis starts again
    assert "cam" in st.model.streams
    st.forget_stream("cam")
    assert "cam" not in st._streams and st.memory("cam")["bytes"] == 0
    assert "cam" not in st.model.streams  # this stage no longer holds the model for it
    assert [f["reason"] for s, k, f in ev if k == "mask_lost"] == ["reset", "stream removed"]


async def test_prompts_by_points_and_box_add_and_remove_objects(models, frames):
    ev = Events()
    st = await make_stage(models, ev, track_source=None, max_objects=2)
    a = st.add_prompt("cam", {"points": [[0.6, 0.5], [0.1, 0.1]], "labels": [1, 0], "normalized": True})
    b = st.add_prompt("cam", {"box": [20, 40, 90, 160]})
    assert (a, b) == (1, 2)
    with pytest.raises(ObjectLimit):
        st.add_prompt("cam", {"box": [0, 0, 10, 10]})
    assert [o["state"] for o in st.objects("cam")] == ["pending", "pending"]
    w = work("cam", 0, frames[0], [(9, BOX_A)])  # track_source null: tracks prompt nothing
    await st.process([w])
    assert [(o["object_id"], o["track_id"], o["prompted"]) for o in objs(w)] == [(1, None, True), (2, None, True)]
    st.remove_object("cam", 1)
    with pytest.raises(ObjectNotFound):
        st.remove_object("cam", 99)
    w = work("cam", 1, frames[1])
    await st.process([w])
    assert [o["object_id"] for o in objs(w)] == [2]
    assert [f["reason"] for s, k, f in ev if k == "mask_lost"] == ["removed through the API"]
    assert st.add_prompt("cam", {"box": [0, 0, 10, 10]}) == 3  # room again


async def test_occluded_then_lost_end_to_end(models, frames):
    """visible_score above every score this model gives: the object is occluded from its first tracked frame and
    lost 0.3 s (source time) later: published once as lost, then no longer followed."""
    ev = Events()
    st = await make_stage(models, ev, visible_score=0.99, lost_after_s=0.3, track_source=None)
    st.add_prompt("cam", {"box": BOX_A})
    states = []
    for i in range(7):
        w = work("cam", i, frames[i])
        await st.process([w])
        states.append([o["state"] for o in objs(w)])
    assert states == [["occluded"], ["occluded"], ["occluded"], ["lost"], [], [], []]
    assert ev.kinds("cam") == ["mask_occluded", "mask_lost"]
    assert st.memory("cam")["objects"] == 0


async def test_an_occluded_object_that_scores_again_reappears_end_to_end(models, frames):
    """Through the stage: occluded (the scores of this random-weight model are below visible_score 0.99), then the
    threshold is lowered under its scores (random weights cannot be made to see an object come back, so the
    threshold moves instead of the object): visible again, `mask_reappeared` once, followed on."""
    ev = Events()
    st = await make_stage(models, ev, visible_score=0.99, lost_after_s=60, track_source=None)
    st.add_prompt("cam", {"box": BOX_A})
    states = []
    for i in range(6):
        if i == 3:
            for obj in st._streams["cam"].objects.values():
                obj.visibility.visible_from = 0.0  # every score is at or above it now
        w = work("cam", i, frames[i])
        await st.process([w])
        states.append([o["state"] for o in objs(w)])
    assert states == [["occluded"]] * 3 + [["visible"]] * 3
    assert ev.kinds("cam") == ["mask_occluded", "mask_reappeared"]
    assert ev[1][2]["object_id"] == 1


async def test_segment_stages_of_two_pipelines_share_the_models_passes(models, frames):
    """Two segment stages (two pipelines) on one SAM 2 model: their rounds go through the model's one batcher, so
    frames of both meet in one pass of the image encoder, and each stream's masks are what it gets alone."""
    alone, p1, p2 = await make_stage(models), await make_stage(models), await make_stage(models)
    a_alone = []
    for i in range(6):
        w = work("a", i, frames[i], [(1, BOX_A)] if i == 0 else [])
        await alone.process([w])
        a_alone.append(objs(w))
    async with p1.model.use() as engine:
        assert engine is models.get_entry(p2.model.name).obj and engine.forward_batch == 8
    seen = len(engine.batcher.batch_sizes)

    async def run(stage: Segment, sid: str, first: int, tracks: list[tuple[int, list[float]]]) -> list[Any]:
        out = []
        for i in range(6):
            w = work(sid, i, frames[first + i], tracks if i == 0 else [])
            await stage.process([w])
            out.append(objs(w))
        return out

    a_shared, b_shared = await asyncio.gather(run(p1, "a", 0, [(1, BOX_A)]), run(p2, "b", 100, [(5, BOX_B)]))
    sizes = list(engine.batcher.batch_sizes)[seen:]
    assert sum(sizes) == 12 and max(sizes) == 2, sizes  # frames of both pipelines in one pass
    for x, y in zip(a_alone, a_shared):
        (ox,), (oy,) = x, y
        mx, my = decode(ox["mask"]), decode(oy["mask"])
        assert (mx & my).sum() / max(1, (mx | my).sum()) > 0.999
        assert abs(ox["score"] - oy["score"]) < 1e-3
    assert [[o["track_id"] for o in x] for x in b_shared] == [[5]] * 6


async def test_a_jobs_frames_wait_in_the_models_lower_class(models, frames):
    """Issue 17's priority on SAM 2 too: a job's frame (stream id `_job:...`) goes into the shared model batcher's
    lower class, behind live streams' frames; both are served once the device is free. The device's one thread is
    held by the test, so what waits in the batcher can be looked at (no timing)."""
    from streamd.models.executors import device_executor

    st = await make_stage(models)
    await st.process([work("live-a", 0, frames[0], [(1, BOX_A)])])  # a live stream, followed
    async with st.model.use() as engine:
        pass
    gate = threading.Event()
    device_executor("cpu").submit(gate.wait, 60)  # the device is busy: rounds wait in the batcher
    try:
        live = asyncio.create_task(st.process([work("live-a", 1, frames[1])]))
        await until(lambda: engine.batcher.running == (1, 0), 30)  # the live round is taken, waits for the device
        job = asyncio.create_task(st.process([work("_job:j1", 0, frames[50], [(1, BOX_B)])]))
        await until(lambda: engine.batcher.waiting == 1, 30)
        assert engine.batcher.waiting_low == 1  # the job's frame is in the lower class
    finally:
        gate.set()
    (lw,), (jw,) = await asyncio.wait_for(asyncio.gather(live, job), 120)
    assert [o["object_id"] for o in objs(lw)] == [1] and len(objs(jw)) == 1
    st.forget_stream("live-a")
    st.forget_stream("_job:j1")
    await st.teardown()


async def test_a_missing_checkpoint_fails_the_stage_with_a_clear_reason(models):
    from streamd.models.errors import ModelLoadFailed

    assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: this machine has no hub
    with pytest.raises(ModelLoadFailed) as e:
        await make_stage(models, checkpoint="hub", image_size=None)
    msg = str(e.value)
    assert "facebook/sam2.1-hiera-tiny/sam2.1_hiera_tiny.pt" in msg and "offline" in msg
    assert "checkpoint: /path/to/sam2.1_hiera_tiny.pt" in msg
    with pytest.raises(ModelLoadFailed, match="is not a file on this machine"):
        await make_stage(models, checkpoint="/nonexistent/sam2.1_hiera_tiny.pt")


async def test_options_are_checked(models):
    from streamd.models.errors import ModelLoadFailed

    with pytest.raises(ConfigError, match=r"pipelines\.seg\.stages\.2\.memory_frame"):
        build_stage(StageConfig(type="segment", memory_frame=3), "pipelines.seg.stages.2")
    with pytest.raises(ConfigError, match=r"pipelines\.seg\.stages\.2\.model.*unknown model 'sam3-huge'"):
        await make_stage(models, model="sam3-huge")  # a bare name: neither declared nor an alias
    with pytest.raises(ModelLoadFailed, match="unknown SAM 2 model 'sam3.huge'"):
        await make_stage(models, model="sam3.huge")
    with pytest.raises(StageError, match="memory_frames 7 is more than"):
        await make_stage(models, memory_frames=7)


@pytest.mark.skipif("not __import__('torch').cuda.is_available()", reason="needs a CUDA GPU (bf16 autocast on it)")
async def test_on_a_gpu_bf16(frames):
    m = ModelManager()
    try:
        st = Segment.from_config(StageConfig(type="segment", checkpoint="random", image_size=256, device="cuda"),
                                 "pipelines.seg.stages.2")
        st.bind(StageContext(models=m, events=Events()))
        await st.setup()
        ws = [work(f"s{k}", 0, frames[k], [(1, BOX_A), (2, BOX_B)]) for k in range(4)]
        await st.process(ws)
        for i in range(1, 10):
            more = [work(f"s{k}", i, frames[k + i]) for k in range(4)]
            await st.process(more)
        assert all(len(objs(w)) == 2 for w in more)
        assert st.model.entry.precision() == "bf16"
    finally:
        await m.aclose()


# -- end to end: a daemon, the real person detector, ByteTrack, SAM 2 -------------------------------------------
async def test_end_to_end_tracks_prompt_masks_published_to_redis(r, redis_server, tmp_path):
    """A 3 s clip of a pan over zidane.jpg (two people) through detect -> track -> segment with a declared
    sam2 model: each track that starts gets an object; every record after it carries its mask, RLE of the frame's
    size; visible_score 0.99 (above what this random model scores) makes them occluded, then lost, as events."""
    clip = make_pan_clip(tmp_path / "z.mp4", "zidane.jpg", seconds=3, fps=10, size=(480, 270))
    seg = {"type": "segment", "model": "sam2-test", "visible_score": 0.99, "lost_after_s": 0.6, "max_objects": 4}
    pipeline = {"stages": PERSON + [{"type": "track", "tracker": "bytetrack"}, seg]}
    cfg = make_config(redis_server.url, [{"id": "z", "url": str(clip), "fps": 5.0, "pipeline": "dts"}],
                      pipelines={"dts": pipeline},
                      models={"catalog": {"sam2-test": {"source": "sam2.1-hiera-tiny", "kind": "sam2", "device": "cpu",
                                                        "options": {"checkpoint": "random", "image_size": SIZE}}}})
    async with running(cfg) as d:
        await until(lambda: d.streams.runners["z"].state.value == "stopped", 180, what="end of clip")
        await until(lambda: _n_results(r, "z", 15), 60, what="15 results")
        recs = await results(r, "z")
        assert d.models.get_entry("sam2-test").state.value == "ready"
    evs = await events(r, "z")
    started = {e["track_id"] for e in evs if e["type"] == "track_started"}
    assert len(started) >= 2  # the two men
    seen_tracks = set()
    for rec in recs:
        assert rec["error"] is None
        seg_out = rec["outputs"]["segment"]
        assert seg_out["model"] == "sam2.1-hiera-tiny"
        for o in seg_out["objects"]:
            seen_tracks.add(o["track_id"])
            assert decode(o["mask"]).shape == (270, 480) and o["state"] in ("visible", "occluded", "lost")
    assert started <= seen_tracks  # every track that started prompted an object
    kinds = [e["type"] for e in evs if e["type"].startswith("mask_")]
    assert "mask_occluded" in kinds and "mask_lost" in kinds


async def _n_results(r, sid, n):
    return len(await results(r, sid)) >= n


# -- the API: prompts by hand ------------------------------------------------------------------------------------
async def test_api_prompts_add_and_remove_objects(r, redis_server, frames):
    """POST /api/v1/streams/{id}/segment adds an object (box or points, pixels or normalized) that the stream's
    next frame starts following; GET lists them; DELETE stops one; typed errors for the rest."""
    import aiohttp

    seg = {"type": "segment", "checkpoint": "random", "image_size": SIZE, "device": "cpu", "track_source": None,
           "max_objects": 2}
    cfg = api_cfg(redis_server.url, [{"id": "cam", "url": "redis:frames:cam", "pipeline": "seg"},
                                     {"id": "plain", "url": "redis:frames:plain", "pipeline": "frame_info"}],
                  pipelines={"seg": {"stages": [seg]}})
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        base = d.api_url + "/api/v1/streams/cam/segment"

        async def frame(i: int) -> dict[str, Any]:
            await push_frames(r, "frames:cam", [frames[i]], "png")
            return (await until(lambda: at(i), 60, what=f"result {i}"))["outputs"]["segment"]

        async def at(i: int) -> dict[str, Any] | None:
            recs = await results(r, "cam")
            return recs[i] if len(recs) > i else None

        assert (await frame(0))["objects"] == []
        async with s.post(base, json={"box": BOX_A}, headers=h(OPER)) as resp:
            assert resp.status == 201 and await resp.json() == {"stream_id": "cam", "object_id": 1, "state": "pending"}
        async with s.post(base, json={"points": [[0.2, 0.5]], "normalized": True}, headers=h(OPER)) as resp:
            assert resp.status == 201 and (await resp.json())["object_id"] == 2
        async with s.post(base, json={"box": [0, 0, 5, 5]}, headers=h(OPER)) as resp:
            body = await resp.json()
            assert resp.status == 409 and body["error"]["code"] == "segment_object_limit"
            assert body["error"]["details"] == {"max_objects": 2}
        async with s.get(base, headers=h(READ)) as resp:
            assert [o["state"] for o in (await resp.json())["objects"]] == ["pending", "pending"]
        out = await frame(1)
        assert [(o["object_id"], o["track_id"], o["prompted"]) for o in out["objects"]] == [(1, None, True),
                                                                                           (2, None, True)]
        assert all(decode(o["mask"]).shape == (H, W) for o in out["objects"])
        async with s.get(base, headers=h(READ)) as resp:
            listed = await resp.json()
            assert listed["stage"] == "segment" and [o["object_id"] for o in listed["objects"]] == [1, 2]
            assert listed["memory"]["objects"] == 2 and listed["memory"]["cond_frames"] == 2
        async with s.delete(base + "/1", headers=h(OPER)) as resp:
            assert resp.status == 204
        assert [o["object_id"] for o in (await frame(2))["objects"]] == [2]
        for path, code, status in [(base + "/1", "segment_object_not_found", 404),
                                   (base + "/abc", "segment_object_not_found", 404),
                                   (base + "/²", "segment_object_not_found", 404)]:  # not int("²"): a 500
            async with s.delete(path, headers=h(OPER)) as resp:
                assert resp.status == status and (await resp.json())["error"]["code"] == code
        async with s.delete(base + "/2", headers=h(READ)) as resp:
            assert resp.status == 403  # removing needs operate
        bad = [{}, {"box": [10, 10, 5, 20]}, {"points": [[1, 2, 3]]}, {"points": [[1, 2]], "labels": [2]},
               {"box": [0.1, 0.1, 1.5, 0.5], "normalized": True}, {"labels": [1]}, {"box": BOX_A, "x": 1}]
        for body in bad:
            async with s.post(base, json=body, headers=h(OPER)) as resp:
                assert resp.status == 422 and (await resp.json())["error"]["code"] == "invalid_body", body
        async with s.post(d.api_url + "/api/v1/streams/plain/segment", json={"box": BOX_A}, headers=h(OPER)) as resp:
            e = (await resp.json())["error"]
            assert resp.status == 409 and e["code"] == "segment_unavailable" and "no segment stage" in e["message"]
        async with s.get(d.api_url + "/api/v1/streams/nope/segment", headers=h(READ)) as resp:
            assert resp.status == 404 and (await resp.json())["error"]["code"] == "stream_not_found"
    # object 1 removed by hand; object 2 ends with the stream (the daemon stopped: the stage forgot the stream)
    assert [e["reason"] for e in await events(r, "cam", "mask_lost")] == ["removed through the API", "stream removed"]

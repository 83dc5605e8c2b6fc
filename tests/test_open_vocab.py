"""Open-vocabulary detection (YOLO-World, YOLOE) offline: random-weight models built from yaml, and a
text_embeddings file of random unit vectors of the size the models' heads take (512), so that no text encoder is
needed. Vocabularies change at run time through the real control API and prompt store."""

import aiohttp
import pytest
import torch

from streamd.config import StageConfig
from streamd.errors import StageError
from streamd.models import ModelRegistry, load_yolo
from streamd.prompts import PromptStore
from streamd.samples import load_photo
from streamd.stages import StageContext
from streamd.stages.detect import Detect, DetectOptions, Params, SharedDetector, VocabularyError
from streamd.stages.open_vocab import export_text_embeddings, load_text_embeddings, main as export_main
from conftest import events, make_config, results, running, until

A = ["red car", "person"]
B = ["dog", "person", "cat", "bicycle", "red car"]  # 5 phrases: the head has nc=5 while B is current
PHRASES = sorted({*A, *B, "bus", "traffic light"})
WORLD, YOLOE = "yolov8s-worldv2.yaml", "yoloe-11s-seg.yaml"


@pytest.fixture(scope="module")
def embeddings(tmp_path_factory):
    g = torch.Generator().manual_seed(7)
    emb = {p: torch.nn.functional.normalize(torch.randn(512, generator=g), dim=0) for p in PHRASES}
    path = tmp_path_factory.mktemp("emb") / "vocab.pt"
    torch.save(emb, path)
    return path


def ov_stage(model, emb, **kw):
    return {"type": "detect", "model": model, "vocabulary": A, "text_embeddings": str(emb), "conf": 0.0,
            "imgsz": 160, "max_det": 4, **kw}


async def _detector(d):
    """The one shared detector, once the pipeline's setup loaded it."""
    await until(lambda: d.models._models, 60, what="the model loaded")
    (det,) = d.models._models.values()
    await until(lambda: all(p.ready.is_set() for p in d.pipelines.values()), 60, what="pipelines set up")
    return det


async def _version_records(r, sid, version, n, with_boxes=False):
    """At least `n` records of the vocabulary version; `with_boxes`: one of them with detections too (YOLOE-seg with
    random weights keeps boxes on some frames only: which ones depends on the weights drawn)."""
    recs = [x for x in await results(r, sid) if x["prompt_versions"].get("vocabulary", {}).get("version") == version]
    return len(recs) >= n and (not with_boxes or any(x["outputs"]["detect"]["detections"] for x in recs))


@pytest.mark.parametrize("model", [WORLD, YOLOE])
async def test_vocabulary_switches_at_one_frame_boundary_and_reuses_cached_embeddings(r, redis_server, clip,
                                                                                    embeddings, model):
    cfg = make_config(redis_server.url, [{"id": "ov", "url": str(clip), "fps": 5.0, "playback": "realtime",
                                          "loop": True, "pipeline": "ov"}],
                      pipelines={"ov": {"stages": [ov_stage(model, embeddings)]}},
                      api={"enabled": True, "port": 0})
    torch.manual_seed(0)  # the random weights built from the yaml: the same ones in every run (which frames get boxes)
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        det = await _detector(d)
        yolo, predictor = det.model, det.model.predictor
        assert predictor is not None  # built by the warm-up pass
        boxes = model == YOLOE
        await until(lambda: _version_records(r, "ov", 0, 3, boxes), 60, what="3 records with the config vocabulary")
        url = d.api_url + "/api/v1/prompts/vocabulary/stream:ov"
        for version, phrases in ((1, B), (2, A)):  # 2 phrases -> 5 -> the first 2 again
            async with s.put(url, json={"phrases": phrases}) as resp:
                assert resp.status == 201 and (await resp.json())["version"] == version
            await until(lambda: _version_records(r, "ov", version, 3, boxes), 60,
                        what=f"3 records of version {version}")
        ov = det.open_vocab
        counters = {"encoder_calls": ov.encoder_calls, "builds": ov.vocabulary_builds, "cache_hits": ov.cache_hits}
        same_model = det.model is yolo and det.model.predictor is predictor  # nothing reloaded or rebuilt
        loaded = d.models.loaded()
        state = d.streams.runners["ov"].state.value
    assert state == "live"
    recs = sorted(await results(r, "ov"), key=lambda x: x["seq"])
    stamps = [(x["prompt_versions"]["vocabulary"]["scope"], x["prompt_versions"]["vocabulary"]["version"])
              for x in recs]
    blocks = [v for i, v in enumerate(stamps) if i == 0 or v != stamps[i - 1]]
    # config vocabulary first (version 0, never a store version), then store versions 1 and 2: one boundary each
    assert blocks == [("config", 0), ("stream:ov", 1), ("stream:ov", 2)], blocks
    for x, (scope, version) in zip(recs, stamps):
        assert x["error"] is None, x["error"]
        out = x["outputs"]["detect"]
        assert (out["vocabulary_scope"], out["vocabulary_version"]) == (scope, version)
        phrases = B if version == 1 else A
        # conf 0: random weights give boxes on every frame (YOLOE-seg drops the boxes whose masks come out empty:
        # some of its frames have none, each vocabulary block has some, below)
        if model != YOLOE:
            assert out["detections"], x["seq"]
        for det_ in out["detections"]:
            assert 0 <= det_["class_id"] < len(phrases), (version, det_)
            assert det_["label"] == phrases[det_["class_id"]], (version, det_)
            if model == YOLOE:
                assert det_["mask"]["size"] == [360, 640]
    for block in blocks:
        assert any(x["outputs"]["detect"]["detections"] for x, v in zip(recs, stamps) if v == block), block
    # the embeddings came from the file (no encoder); A was assembled once and re-used when switching back to it
    assert counters == {"encoder_calls": 0, "builds": 2, "cache_hits": 1}, counters
    assert same_model and len(loaded) == 1, loaded


async def test_switched_embeddings_reach_the_predictions(embeddings):
    """Reversing the vocabulary's order reverses the class ids but not what is found: the new embeddings are in
    the model that predicts (a stale copy would swap the labels)."""
    torch.manual_seed(0)
    yolo = load_yolo(WORLD)
    det = SharedDetector(yolo, WORLD, "cpu", 4)
    try:
        assert det.open_vocab.add_file(str(embeddings)) == len(PHRASES)
        img = load_photo("bus.jpg")
        # a first call sets the model up (Ultralytics sets torch's threads for that call; the executor sets them back
        # after it): the calls compared below all run at the same thread count, so their floats are the same
        await det.detect([img], Params(0.0, 0.7, 160, 4, False, None, tuple(A), True))
        outs = {}
        for vocab in (tuple(A), tuple(reversed(A)), tuple(A)):
            (data, _), = await det.detect([img], Params(0.0, 0.7, 160, 4, False, None, vocab, True))
            outs.setdefault(vocab, []).append(data)
        first, back = outs[tuple(A)]
        (rev,) = outs[tuple(reversed(A))]
        assert len(first) and (first == back).all()
        assert (rev[:, :5] == first[:, :5]).all()  # the same boxes and confidences
        assert ((1 - rev[:, 5]) == first[:, 5]).all()  # class ids swapped: the same phrases
        ov = det.open_vocab
        assert (ov.encoder_calls, ov.vocabulary_builds, ov.cache_hits) == (0, 2, 1)
    finally:
        await det.aclose()


async def test_a_vocabulary_that_cannot_be_encoded_fails_its_streams_only(r, redis_server, clip, embeddings):
    store = PromptStore(r)
    bad = ["red car", "unicorn"]  # "unicorn" is not in the file, and the text encoder cannot be fetched offline
    await store.put("vocabulary", "pipeline:ov", {"phrases": bad}, "test")
    await store.put("vocabulary", "stream:good", {"phrases": B}, "test")
    cfg = make_config(redis_server.url, [
        # one live stream, and one file that may well have been read to its end when its frames fail
        {"id": "bad1", "url": str(clip), "fps": 2.0, "playback": "realtime", "loop": True, "pipeline": "ov"},
        {"id": "bad2", "url": str(clip), "fps": 2.0, "pipeline": "ov"},
        {"id": "good", "url": str(clip), "fps": 2.0, "pipeline": "ov"},
    ], pipelines={"ov": {"stages": [ov_stage(WORLD, embeddings, max_det=2)]}})
    async with running(cfg) as d:
        for sid in ("bad1", "bad2"):
            await until(lambda: d.streams.runners[sid].state.value == "failed", 60, what=f"{sid} failed")
        await until(lambda: d.streams.runners["good"].state.value == "stopped", 60, what="good played to its end")
        ov = (await _detector(d)).open_vocab
        reasons = {sid: d.streams.runners[sid].reason for sid in ("bad1", "bad2")}
        encoder_calls, failed = ov.encoder_calls, set(ov.failed)
    for reason in reasons.values():
        assert "unicorn" in reason and "text encoder" in reason and "export_text_embeddings" in reason, reason
        assert "VocabularyError" in reason
    assert encoder_calls == 1  # tried once, then remembered: later frames fail at once
    assert failed == {tuple(bad)}
    for sid in ("bad1", "bad2"):
        evs = await events(r, sid, "state")
        assert evs[-1]["to"] == "failed" and "unicorn" in evs[-1]["reason"], evs
    good = await results(r, "good")
    assert len(good) == 12 and all(x["error"] is None for x in good)  # 6 s at 2 fps, every frame detected
    assert {x["prompt_versions"]["vocabulary"]["version"] for x in good} <= {0, 1}
    for x in await results(r, "bad1"):  # no result from the bad vocabulary
        v = x["prompt_versions"].get("vocabulary", {})
        assert (x["error"] is not None) == (v.get("scope") == "pipeline:ov"), x


async def _setup(opts):
    st = Detect(StageConfig(type="detect"), DetectOptions(**opts))
    models = ModelRegistry()
    st.bind(StageContext(models=models))
    try:
        await st.setup()
    finally:
        await models.aclose()


async def test_bad_text_embeddings_files_are_clear_errors(tmp_path, embeddings):
    cases = {
        "list.pt": (["not", "a", "dict"], "dict phrase -> tensor"),
        "str.pt": ({"person": "x"}, "1-D float tensor"),
        "2d.pt": ({"person": torch.zeros(2, 512)}, "1-D float tensor"),
        "mixed.pt": ({"person": torch.ones(512), "car": torch.ones(256)}, "different sizes"),
        "nan.pt": ({"person": torch.full((512,), float("nan"))}, "non-finite"),
        "empty_key.pt": ({" ": torch.ones(512)}, "non-empty phrase"),
    }
    for name, (data, msg) in cases.items():
        torch.save(data, tmp_path / name)
        with pytest.raises(StageError, match=msg):
            load_text_embeddings(tmp_path / name)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(StageError, match="cannot be read"):
        load_text_embeddings(tmp_path / "junk.pt")
    with pytest.raises(StageError, match="does not exist"):
        load_text_embeddings(tmp_path / "missing.pt")
    # a file of the wrong size for the model, and a file given to a closed-set model, stop the stage at setup
    torch.save({"person": torch.ones(256)}, tmp_path / "256.pt")
    with pytest.raises(StageError, match="256-dim.*needs 512"):
        await _setup({"model": WORLD, "text_embeddings": str(tmp_path / "256.pt"), "imgsz": 64})
    with pytest.raises(StageError, match="not an open-vocabulary model"):
        await _setup({"model": "yolo11n.yaml", "text_embeddings": str(embeddings), "imgsz": 64})


async def test_a_bad_phrase_is_a_vocabulary_error_and_is_remembered(embeddings):
    det = SharedDetector(load_yolo(YOLOE), YOLOE, "cpu", 4)
    try:
        det.open_vocab.add_file(str(embeddings))
        p = Params(0.0, 0.7, 64, 1, False, None, ("person", "  "), True)
        with pytest.raises(VocabularyError, match="non-empty text"):
            await det.detect([load_photo("bus.jpg")], p)
        assert ("person", "  ") in det.open_vocab.failed
        passes = det.forward_passes
        with pytest.raises(VocabularyError):
            await det.detect([load_photo("bus.jpg")], p)
        assert det.forward_passes == passes  # failed at once, without a trip to the device thread
    finally:
        await det.aclose()


def test_export_text_embeddings_offline_is_a_clear_error(tmp_path, capsys):
    from streamd.stages import detect

    assert detect.export_text_embeddings is export_text_embeddings  # the documented name
    out = tmp_path / "e.pt"
    with pytest.raises(StageError, match=r"text encoder clip:ViT-B/32 could not be loaded"):
        export_text_embeddings(load_yolo(WORLD), ["person"], out)
    assert not out.exists()
    with pytest.raises(StageError, match="non-empty text phrases"):
        export_text_embeddings(load_yolo(WORLD), ["person", ""], out)
    assert export_main(["--model", YOLOE, "--out", str(out), "person"]) == 1
    assert "mobileclip:blt could not be loaded" in capsys.readouterr().out
    assert not out.exists()


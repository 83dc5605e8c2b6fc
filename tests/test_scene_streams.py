"""`sampling: scene` as a stream option (issue 17): a live stream keeps a frame when the scene changes and skips
near-duplicates within the floor and ceiling rates; bad values are typed config errors naming the key, and 422s
naming the path from the API. A real clip with two hard cuts played like a camera (realtime), a real
redis-server."""

import aiohttp
import pytest

from conftest import OPER, api_cfg, h, make_config, results, running, until
from streamd.config import parse_config
from streamd.errors import ConfigError
from test_jobs import cuts_clip


async def test_a_live_stream_with_scene_sampling_keeps_the_cuts_and_drops_duplicates(redis_server, r, tmp_path):
    """Three still shots, 2 s each, played in real time: at a ceiling of 10 frames a second the stream looks at 60
    frames; it keeps the first and one at each cut (2 s, 4 s), none of the near-duplicates between them."""
    clip = cuts_clip(tmp_path / "cuts.mp4")
    sid = "scenecam"
    await r.delete(f"streamd:{{{sid}}}:results")
    cfg = make_config(redis_server.url, [{"id": sid, "url": str(clip), "playback": "realtime", "loop": False,
                                          "sampling": "scene",
                                          "scene": {"threshold": 0.08, "min_fps": 0.2, "max_fps": 10}}])
    async with running(cfg) as d:
        runner = d.streams.runners[sid]
        await until(lambda: runner.state.value == "stopped", 60, what="the clip played to its end")
        await until(lambda: results_len(r, sid, 3), 10, what="three results")
        recs = await results(r, sid)
    assert [x["pts_s"] for x in recs] == [0.0, 2.0, 4.0], [x["pts_s"] for x in recs]
    assert [x["seq"] for x in recs] == [0, 1, 2]


async def results_len(r, sid, n):
    return len(await results(r, sid)) >= n


@pytest.mark.parametrize("scene, key", [({"threshold": 2}, "streams.0.scene.threshold"),
                                        ({"max_fps": 0}, "streams.0.scene.max_fps"),
                                        ({"min_fps": 6, "max_fps": 5}, "streams.0.scene"),
                                        ({"treshold": 0.1}, "streams.0.scene.treshold")])
def test_bad_scene_values_are_config_errors_naming_the_key(scene, key):
    with pytest.raises(ConfigError) as e:
        parse_config({"streams": [{"id": "c", "url": "rtsp://cam.example/x", "sampling": "scene", "scene": scene}]},
                     environ={})
    assert e.value.key == key, str(e.value)
    with pytest.raises(ConfigError) as e:
        parse_config({"streams": [{"id": "c", "url": "rtsp://cam.example/x", "sampling": "shots"}]}, environ={})
    assert e.value.key == "streams.0.sampling", str(e.value)


async def test_the_api_takes_scene_sampling_and_refuses_bad_values(redis_server, r):
    cfg = api_cfg(redis_server.url)
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        async def post(body):
            async with s.post(d.api_url + "/api/v1/streams", json=body, headers=h(OPER)) as resp:
                return resp.status, await resp.json()
        base = {"id": "scn", "url": "rtsp://127.0.0.1:9/x", "paused": True}
        for extra, path in (({"sampling": "shots"}, "sampling"),
                            ({"sampling": "scene", "scene": {"threshold": 0}}, "scene.threshold"),
                            ({"sampling": "scene", "scene": {"min_fps": 9, "max_fps": 1}}, "scene")):
            status, body = await post({**base, **extra})
            assert status == 422 and body["error"]["code"] == "invalid_body", body
            assert body["error"]["details"]["errors"][0]["path"] == path, body
        status, body = await post({**base, "sampling": "scene", "scene": {"threshold": 0.2, "max_fps": 4}})
        assert status == 201, body
        runner = d.streams.runners["scn"]
        scene, fps = runner.sampler.scene, runner.fps
        async with s.delete(d.api_url + "/api/v1/streams/scn", headers=h(OPER)) as resp:
            assert resp.status in (200, 204)
    assert scene is not None and (scene.threshold, scene.ceiling_s, fps) == (0.2, 0.25, 4.0)

"""The web page in a real browser (Debian's chromium driven by Playwright; scripts/bootstrap.sh --tests installs
both) against a real daemon: the person detector and a tracker on a clip, a VLM stage asking a scripted
OpenAI-compatible server. Screenshots go to the test's tmp_path."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import aiohttp
import pytest

from streamd import keys
from streamd.testing.openai import ScriptedOpenAI
from conftest import ADMIN, PERSON, READ, api_cfg, at_least, h, running, until

pw = pytest.importorskip("playwright.async_api")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip("no chromium (scripts/bootstrap.sh --tests installs it)", allow_module_level=True)

PALETTE = [(255, 56, 56), (72, 249, 10), (0, 194, 255), (255, 178, 29), (207, 210, 49), (146, 204, 23),
           (61, 219, 134), (26, 147, 52), (0, 212, 187), (44, 153, 168), (52, 69, 147), (100, 115, 255),
           (0, 24, 236), (132, 56, 255), (82, 0, 133), (203, 56, 255), (255, 149, 200), (255, 55, 199)]


def people_cfg(redis_url: str, vlm_url: str):
    stages = [*PERSON, {"type": "track"},
              {"type": "vlm", "model": "scripted", "endpoints": [{"url": vlm_url}], "every_s": 1}]
    return stages


@pytest.fixture
async def browser():
    async with pw.async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            await b.close()


async def open_page(browser, url: str, errors: list[str]):
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    # script errors and CSP violations ("Refused to ..."); an answered 4xx (401 before the token, the 422 shown)
    # is logged by the browser as "Failed to load resource" and is what the page expects
    page.on("console", lambda m: m.type == "error" and not m.text.startswith("Failed to load resource")
            and errors.append(m.text))
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(url)
    return page


async def enter_token(page, token: str) -> None:
    await page.wait_for_selector("#token-gate:not([hidden])")
    await page.fill("#token-input", token)
    await page.click("#token-form button")
    await page.wait_for_selector("#app:not([hidden])")


async def test_page_live_view_prompts_and_errors(r, redis_server, clip, browser, tmp_path):
    vlm = await ScriptedOpenAI(lambda req: "a person in view").start()
    cam = {"id": "cam", "url": str(clip), "fps": 2.0, "playback": "realtime", "loop": True, "pipeline": "people"}
    cfg = api_cfg(redis_server.url, [cam], pipelines={"people": {"stages": people_cfg(redis_server.url, vlm.url)}})
    errors: list[str] = []
    try:
        async with running(cfg) as d, aiohttp.ClientSession() as s:
            page = await open_page(browser, d.api_url + "/", errors)
            # without a token: the gate and nothing else
            await page.wait_for_selector("#token-gate:not([hidden])")
            assert await page.is_hidden("#app") and await page.locator(".card").count() == 0
            await page.screenshot(path=str(tmp_path / "token-gate.png"))
            await enter_token(page, ADMIN)

            # the list: the stream live, its latest frame with boxes drawn
            card = page.locator('.card[data-stream="cam"]')
            await card.locator(".state.live").wait_for(timeout=60_000)
            await page.wait_for_function(
                "() => Number(document.querySelector('.card[data-stream=cam] canvas').dataset.boxes) > 0",
                timeout=60_000)
            assert "latency" in await card.locator(".meta").inner_text()
            await page.screenshot(path=str(tmp_path / "list.png"))

            # the live view: boxes drawn on the canvas where the result record puts them
            await card.locator("h3 a").click()
            await page.wait_for_function("() => Number(document.getElementById('live').dataset.boxes) > 0",
                                         timeout=60_000)
            eid = await page.eval_on_selector("#live", "c => c.dataset.entry")
            entry = await r.xrange(keys.results_key("cam"), eid, eid)
            rec = json.loads(entry[0][1][b"record"])
            det = rec["outputs"]["detect"]["detections"][0]
            x1, y1, x2, y2 = det["box"]
            # the edge is a stroke 2+ pixels wide centred on x1: one pixel of x1 - 1 .. x1 + 1 lies wholly inside it
            # (its neighbours are anti-aliased, in part the frame)
            row = await page.evaluate(
                """([x, y]) => { const c = document.getElementById('live');
                   return Array.from(c.getContext('2d').getImageData(x, y, 3, 1).data); }""",
                [math.floor(x1) - 1, round((y1 + y2) / 2)])
            want = PALETTE[det["track_id"] % len(PALETTE)]
            pixels = [row[i:i + 3] for i in range(0, 12, 4)]
            assert min(max(abs(a - b) for a, b in zip(px, want)) for px in pixels) <= 40, (pixels, want, x1, eid)
            await page.wait_for_function(
                "() => document.querySelector('#sv-events').textContent.includes('→ live')")
            await page.screenshot(path=str(tmp_path / "live.png"))

            # a prompt edited in the page: a new version, and the next result shown carries it
            await page.wait_for_selector("#p-current:has-text('none at this scope')")
            await page.fill("#p-text", "Who is in view?\nCount them.")
            await page.fill("#p-note", "from the page")
            await page.click("#p-save")
            await page.wait_for_selector("#p-current:has-text('version 1 by alice: from the page')")
            await page.wait_for_function(
                "() => document.getElementById('sv-prompt-versions').textContent.includes('stream:cam v1')",
                timeout=30_000)
            await page.fill("#p-text", "Who is in view?\nCount the people.")
            await page.click("#p-save")
            await page.wait_for_selector("#p-current:has-text('version 2')")
            await page.click("#p-history tr[data-version='1'] button:has-text('diff')")
            diff = await page.inner_text("#p-diff")
            assert "- Count them." in diff and "+ Count the people." in diff and "  Who is in view?" in diff
            await page.screenshot(path=str(tmp_path / "prompt-diff.png"))
            await page.click("#p-history tr[data-version='1'] button:has-text('roll back')")
            await page.wait_for_selector("#p-current:has-text('version 3')")
            async with s.get(d.api_url + "/api/v1/prompts/vlm/stream:cam", headers=h(READ)) as resp:
                cur = await resp.json()
            assert cur["version"] == 3 and cur["text"] == "Who is in view?\nCount them." and \
                cur["rolled_back_from"] == 1
            await page.wait_for_function(
                "() => document.getElementById('sv-prompt-versions').textContent.includes('stream:cam v3')",
                timeout=30_000)

            # pause and resume from the page
            await page.click("#sv-pause:has-text('Pause')")
            await page.wait_for_selector("#sv-state:has-text('stopped: paused')")
            assert d.streams.runners["cam"].cfg.paused
            await page.click("#sv-pause:has-text('Resume')")
            await page.wait_for_selector("#sv-state.live", timeout=60_000)

            # a bad stream URL entered in the page shows the API's error
            await page.goto(d.api_url + "/#/")
            await page.wait_for_selector("#list-view:not([hidden])")
            await page.click("#add-stream summary")
            await page.fill("#add-form input[name=id]", "bad")
            await page.fill("#add-form input[name=url]", "file:///etc/passwd")
            await page.click("#add-form button")
            await page.wait_for_selector("#add-error:has-text('scheme_not_allowed')")
            async with s.post(d.api_url + "/api/v1/streams", headers=h(ADMIN),
                              json={"id": "bad", "url": "file:///etc/passwd", "pipeline": "people"}) as resp:
                api_error = (await resp.json())["error"]
            assert api_error["message"] in await page.inner_text("#add-error")
            assert "bad" not in d.streams.runners
            await page.screenshot(path=str(tmp_path / "add-error.png"))

            # remove from the page
            await page.goto(d.api_url + "/#/stream/cam")
            page.once("dialog", lambda dlg: dlg.accept())
            await page.click("#sv-remove")
            await page.wait_for_selector("#list-view:not([hidden])")
            await until(lambda: "cam" not in d.streams.runners, what="the stream removed")
    finally:
        await vlm.stop()
    assert errors == [], errors  # no script error, no CSP violation


async def test_page_without_a_token_shows_only_the_gate(r, redis_server, browser, tmp_path):
    errors: list[str] = []
    async with running(api_cfg(redis_server.url)) as d, aiohttp.ClientSession() as s:
        async with s.get(d.api_url + "/") as resp:  # the page itself needs no token, and allows only itself
            assert resp.status == 200
            csp = resp.headers["Content-Security-Policy"]
            assert "script-src 'self'" in csp and "default-src 'none'" in csp and "unsafe-inline" not in csp
            assert "<script>" not in await resp.text()  # no inline script
        async with s.get(d.api_url + "/ui/../../config.py") as resp:
            assert resp.status == 404
        page = await open_page(browser, d.api_url + "/", errors)
        seen: list[str] = []
        page.on("request", lambda req: seen.append(req.url))
        await page.wait_for_selector("#token-gate:not([hidden])")
        assert await page.is_hidden("#app")
        await page.fill("#token-input", "not-a-token-0123456789")
        await page.click("#token-form button")
        await page.wait_for_selector("#token-error:has-text('refused')")
        assert await page.is_hidden("#app") and await page.locator(".card").count() == 0
        assert not any("token" in u for u in seen)  # never in a URL
        await page.screenshot(path=str(tmp_path / "refused.png"))
        await enter_token(page, READ)
        assert await page.is_visible("#list-view")
        assert await page.evaluate("sessionStorage.getItem('streamd.token')") == READ
    assert errors == [], errors


async def test_page_without_tokens_on_loopback(r, redis_server, browser, tmp_path):
    """No tokens (loopback only): no gate; the page's own requests pass the Host/Origin/JSON checks (a stream added
    and paused from the page), which refuse the same requests from another origin."""
    from conftest import make_config

    errors: list[str] = []
    cfg = make_config(redis_server.url, [], api={"enabled": True, "port": 0})
    async with running(cfg) as d:
        page = await open_page(browser, d.api_url + "/", errors)
        await page.wait_for_selector("#list-view:not([hidden])")
        assert await page.is_hidden("#token-gate") and await page.is_hidden("#forget-token")
        await page.click("#add-stream summary")
        await page.fill("#add-form input[name=id]", "yard")
        await page.fill("#add-form input[name=url]", "redis:frames:yard")
        await page.select_option("#add-form select[name=pipeline]", "frame_info")
        await page.click("#add-form button")
        await page.wait_for_selector("#stream-view:not([hidden])")
        await until(lambda: "yard" in d.streams.runners, what="the stream added from the page")
        await page.click("#sv-pause:has-text('Pause')")
        await page.wait_for_selector("#sv-state:has-text('paused')")
        await page.screenshot(path=str(tmp_path / "no-token.png"))
    assert errors == [], errors



async def test_page_draws_masks_where_the_record_puts_them(r, redis_server, browser, tmp_path):
    """A SAM 2 segment stage's record (an object prompted with a box through the API; its mask as COCO RLE, as
    consumers get it) tinted on the list's canvas: inside the mask the canvas is the frame half-blended with the
    object's colour, outside it the frame as it is. The same mask on a detection (a segmentation model's record:
    random seg weights here give masks that fill the frame, so it is handed to the page's drawing code as such a
    record) is tinted in the detection's colour."""
    import base64
    import io

    import numpy as np
    import torch
    from PIL import Image

    from conftest import make_config
    from streamd.samples import load_photo, pan_frames
    from streamd.testing.media import push_frames

    pytest.importorskip("sam2", reason="the segment stage needs the sam2 package (scripts/bootstrap.sh installs it)")
    torch.manual_seed(2)  # random weights, the same every run: with this seed the mask covers part of the frame
    frames = list(pan_frames(load_photo(), 2, 10, (320, 180)))
    seg = {"type": "segment", "checkpoint": "random", "image_size": 128, "device": "cpu", "track_source": None}
    cfg = make_config(redis_server.url, [{"id": "seg", "url": "redis:frames:seg", "pipeline": "s"}],
                      pipelines={"s": {"stages": [seg]}}, api={"enabled": True, "port": 0})  # no tokens: no gate
    errors: list[str] = []
    async with running(cfg) as d, aiohttp.ClientSession() as s:
        await push_frames(r, "frames:seg", frames[:1], "png")
        await until(lambda: at_least(r, "seg", 1), 60, what="the first result")
        async with s.post(d.api_url + "/api/v1/streams/seg/segment", json={"box": [60, 30, 260, 160]}) as resp:
            assert resp.status == 201, await resp.text()
        await push_frames(r, "frames:seg", frames[1:], "png")
        recs = await until(lambda: at_least(r, "seg", 2), 60, what="the result with the object")
        (obj,) = recs[1]["outputs"]["segment"]["objects"]
        eid = (await r.xrevrange(keys.results_key("seg"), count=1))[0][0].decode()
        page = await open_page(browser, d.api_url + "/", errors)
        await page.wait_for_function(
            "(eid) => document.querySelector('.card[data-stream=seg] canvas')?.dataset.entry === eid", arg=eid,
            timeout=30_000)
        await page.screenshot(path=str(tmp_path / "segment-mask.png"))
        # the canvas as drawn, and the frame alone (the same snapshot, decoded by the same browser)
        det = {"label": "person", "class_id": 3, "confidence": 0.9, "box": [0, 0, 320, 180], "mask": obj["mask"]}
        drawn, plain, as_det = await page.evaluate("""async ([eid, det]) => {
            const { drawFrame } = await import('/ui/draw.js');
            const c = document.querySelector('.card[data-stream=seg] canvas');
            const resp = await fetch(`/api/v1/streams/seg/snapshot.jpg?entry=${eid}`);
            const bitmap = await createImageBitmap(await resp.blob());
            const f = document.createElement('canvas'), g = document.createElement('canvas');
            [f.width, f.height] = [bitmap.width, bitmap.height];
            f.getContext('2d').drawImage(bitmap, 0, 0);
            drawFrame(g, bitmap, { outputs: { detect: { detections: [det] } } });
            return [c.toDataURL('image/png'), f.toDataURL('image/png'), g.toDataURL('image/png')]; }""", [eid, det])
    assert errors == [], errors

    def pixels(url: str) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")).astype(int)

    canvas, frame = pixels(drawn), pixels(plain)
    assert canvas.shape == frame.shape == (180, 320, 3) and obj["mask"]["size"] == [180, 320]
    counts = obj["mask"]["counts"]
    mask = np.repeat(np.arange(len(counts)) % 2 == 1, counts).reshape(320, 180).T  # column-major, zeros first
    tint = (frame + PALETTE[obj["object_id"] % len(PALETTE)]) >> 1  # no track: the object's own colour
    inside = mask & (np.abs(tint - frame).max(axis=2) >= 16)  # where a tint shows
    assert inside.sum() > 500 and (~mask).sum() > 500, (inside.sum(), (~mask).sum())
    near = lambda a, b: np.abs(a - b).max(axis=1) <= 3  # noqa: E731
    assert near(canvas[inside], tint[inside]).mean() > 0.99, "the mask is not drawn where the record puts it"
    assert near(canvas[~mask], frame[~mask]).mean() > 0.99, "the canvas is tinted outside the mask"
    # the detection: its box is the frame's edge, its label at the top left (drawn over the mask: not compared)
    canvas = pixels(as_det)
    tint = (frame + PALETTE[det["class_id"]]) >> 1
    clear = np.zeros_like(mask)
    clear[5:-5, 5:-5] = True
    clear[:25, :160] = False
    inside, outside = mask & clear & (np.abs(tint - frame).max(axis=2) >= 16), ~mask & clear
    assert inside.sum() > 500, inside.sum()
    assert near(canvas[inside], tint[inside]).mean() > 0.99, "a detection's mask is not drawn"
    assert near(canvas[outside], frame[outside]).mean() > 0.99, "the canvas is tinted outside a detection's mask"


async def test_page_skips_masks_whose_counts_are_not_runs_of_the_frame(r, redis_server, browser):
    """draw.js tints a mask only if its RLE counts are integers 0..h*w summing to h*w: a run of 3e9 (it looped for
    seconds per frame, the page hung), negative or fractional runs, too many counts, strings are not drawn; the
    good mask beside them is."""
    import asyncio

    from conftest import make_config

    h, w = 36, 64
    n = h * w
    hostile = [[0, 3e9], [0, n + 100, -100], [0.5, n - 0.5], [0] * (n + 2) + [n], ["0", str(n)], [True, n - 1],
               [0, n, 1]]
    good = [h * 10, h * 20, n - h * 30]  # columns 10..29
    cfg = make_config(redis_server.url, [], api={"enabled": True, "port": 0})  # no tokens: no gate
    errors: list[str] = []
    async with running(cfg) as d:
        page = await open_page(browser, d.api_url + "/", errors)
        tinted = await asyncio.wait_for(page.evaluate("""async ([h, w, masks]) => {
            const { drawFrame } = await import('/ui/draw.js');
            const f = document.createElement('canvas');
            [f.width, f.height] = [w, h];
            const fc = f.getContext('2d');
            fc.fillStyle = 'rgb(128,128,128)';
            fc.fillRect(0, 0, w, h);
            const bitmap = await createImageBitmap(f);
            return masks.map((counts) => {
                const g = document.createElement('canvas');
                drawFrame(g, bitmap, { outputs: { segment: { objects: [
                    { object_id: 1, mask: { size: [h, w], counts } }] } } });
                const px = g.getContext('2d').getImageData(0, 0, w, h).data;
                let changed = 0;
                for (let i = 0; i < px.length; i += 4) if (px[i] !== 128 || px[i + 1] !== 128) changed++;
                return changed; }); }""", [h, w, [*hostile, good]]), 120)
    assert errors == [], errors
    assert tinted == [0] * len(hostile) + [h * 20], tinted

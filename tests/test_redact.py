"""Credentials never reach logs, events, metrics, the fleet's member records or API responses: redact_url over hostile
URLs (a password holding '#', '?', '/', '@', '%40', ':' or unicode; presigned-URL and token parameters, repeated and
in any case; fragments; ';' parameters; IPv6 hosts; URLs that do not parse), tracebacks without local variables, and
end to end: streams with such URLs (loopback, a closed port) on a fleet of two real daemons."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
import redis.asyncio as aioredis

from conftest import ADMIN, READ, api_cfg, h, until
from streamd import keys
from streamd.api.errors import ApiError
from streamd.api.security import check_authority
from streamd.egress import EgressError, EgressRules, StreamEgress
from streamd.errors import SourceError
from streamd.keys import API_STREAMS_KEY, FLEET_MEMBERS_KEY
from streamd.log import get_logger, redact_text, redact_url, scrub, setup_logging, url_secrets
from streamd.sources import parse_reference
from streamd.testing.daemon import running

# (URL, secrets that must not show, pieces that must show)
HOSTILE = [
    ("rtsp://admin:hunter2@10.0.0.5:554/stream1", ["hunter2", "admin"], ["rtsp://", "10.0.0.5:554", "/stream1"]),
    ("rtsp://admin:hunter#2@10.0.0.5:554/cam", ["hunter", "admin"], ["10.0.0.5:554", "/cam"]),
    ("rtsp://admin:p?ss@10.0.0.5/stream", ["p?ss", "admin"], ["10.0.0.5", "/stream"]),
    ("rtsp://admin:a/b/c@10.0.0.5/stream", ["a/b/c"], ["10.0.0.5", "/stream"]),
    ("rtsp://admin:p@ss@w0rd@10.0.0.5/cam", ["p@ss", "ss@w0rd", "w0rd"], ["10.0.0.5", "/cam"]),
    ("rtsp://admin:a@b/c@10.0.0.5/cam", ["a@b", "b/c"], ["10.0.0.5", "/cam"]),
    ("rtsp://admin:p%40ss%3Aw%23rd@cam.local:8554/live", ["p%40ss", "w%23rd"], ["cam.local:8554", "/live"]),
    ("rtsp://admin:pa:ss:wd@cam.local/live", ["pa:ss:wd", "ss:wd"], ["cam.local", "/live"]),
    ("rtsp://admin:pässwörd€@cam.local/live", ["pässwörd€", "sswö"], ["cam.local", "/live"]),
    ("rtsp://admin:top#s3cret?x/y@[fe80::1%25eth0]:554/a", ["top", "s3cret"], ["[fe80::1%25eth0]:554", "/a"]),
    ("http://user:pw0rd@[::1]:8080/v.m3u8", ["pw0rd", "user:"], ["[::1]:8080", "/v.m3u8"]),
    ("rtsp://tok3nonly#x@host.example/cam", ["tok3nonly"], ["host.example", "/cam"]),
    ("rtsp://admin:my pass@host.example/cam", ["my pass"], ["host.example", "/cam"]),
    ("rtsp://admin:hunter2@[bad/cam", ["hunter2"], []),  # does not parse (urlsplit: ValueError)
    ("admin:hunter2@10.0.0.5:554/cam", ["hunter2"], ["10.0.0.5:554/cam"]),
    ("https://bucket.s3.amazonaws.com/v.m3u8?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAEXAMPLE%2F2026"
     "&X-Amz-Signature=deadbeef&X-Amz-Security-Token=FQoGZXIvYXdz",
     ["AKIAEXAMPLE", "deadbeef", "FQoGZXIvYXdz"], ["bucket.s3.amazonaws.com", "/v.m3u8", "X-Amz-Signature="]),
    ("https://cdn.example.com/live.m3u8?hdnts=exp=1~acl=/*~hmac=abcd1234", ["abcd1234", "acl="], ["/live.m3u8"]),
    ("https://cdn.example.com/live.m3u8?jwt=eyJhbGciOi.secret.sig", ["eyJhbGciOi", "secret.sig"], ["cdn.example.com"]),
    ("https://cdn.example.com/a.m3u8?session_token=s3cr3t&Policy=eyJwb2xp&Key-Pair-Id=K2JCJMDEHXQW5F",
     ["s3cr3t", "eyJwb2xp", "K2JCJMDEHXQW5F"], ["/a.m3u8"]),
    ("https://cdn.example.com/a.m3u8?authorization=Bearer%20s3cr3t", ["s3cr3t"], ["/a.m3u8"]),
    ("http://cam.local/video.mjpg?user=admin&password=hunter2", ["hunter2"], ["cam.local", "/video.mjpg"]),
    ("http://cam.local/video.mjpg?usr=admin&pwd=hunter2", ["hunter2"], ["cam.local"]),
    ("http://cam.local/cgi?loginuse=admin&loginpas=hunter2", ["hunter2"], ["cam.local", "/cgi"]),
    ("http://cam.local/x?PASSWORD=one1&Password=two2&password=three3&pAsSwOrD=four4",
     ["one1", "two2", "three3", "four4"], ["cam.local"]),
    ("http://cam.local/x?pass%77ord=enc0ded&Pass+Word=sp4ced", ["enc0ded", "sp4ced"], ["cam.local"]),
    ("http://cam.local/x?channel=1&sig=abc&sig=def;token=ghi789", ["abc", "def", "ghi789"], ["channel=1"]),
    ("http://cam.local/x?t=8f14e45fceea167a5a36dedd4bea2543", ["8f14e45fceea167a"], ["cam.local"]),
    ("https://cam.local/live#access_token=fr4gment&x=1", ["fr4gment"], ["cam.local", "/live"]),
    ("https://cam.local/live#eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2ln", ["eyJhbGciOiJIUzI1NiJ9"],
     ["cam.local", "/live#"]),
    ("rtsp://cam.local/live;password=s3mi;user=bob/stream", ["s3mi", "bob"], ["cam.local", "/live;", "/stream"]),
    ("https://x.blob.core.windows.net/c/v.mp4?sv=2021&se=2026&sp=r&sig=AzUr3Sig%3D", ["AzUr3Sig"], ["/c/v.mp4"]),
]


@pytest.mark.parametrize(("url", "secrets", "shown"), HOSTILE, ids=[u[:40] for u, _, _ in HOSTILE])
def test_redact_url_hides_every_credential(url, secrets, shown):
    out = redact_url(url)
    for s in secrets:
        assert s not in out, (url, out)
    for piece in shown:
        assert piece in out, (url, out)
    assert "***" in out, out
    assert redact_url(out) == out  # stable: a redacted URL redacted again is the same
    if "://" in url:
        text = redact_text(f"error: cannot open {url} (Connection refused)")  # the same inside free text
        for s in secrets:
            assert s not in text, text


@pytest.mark.parametrize(("url", "quoted"), [
    ("rtsp://admin:hunter#2@127.0.0.1:9/cam", "Port could not be cast to integer value as 'hunter'"),
    ("rtsp://admin:p?ss/w0rd@127.0.0.1:9/cam", "no such host 'admin' path '/w0rd@127.0.0.1:9/cam'"),
    ("rtsp://admin:p%40ss%3Aw%23rd@cam.local/live", "login failed for admin with p@ss:w#rd"),
    ("http://h/v?X-Amz-Signature=deadbeefsig&token=t0k3nval", "HTTP 403: signature deadbeefsig expired (t0k3nval)"),
])
def test_scrub_takes_the_url_credentials_out_of_any_message(url, quoted):
    out = scrub(quoted, url_secrets(url))
    for s in ("hunter", "w0rd", "p@ss", "deadbeefsig", "t0k3nval"):
        assert s not in out, out
    assert "***" in out


@pytest.mark.parametrize("url", ["rtsp://10.0.0.5:554/stream1?channel=1&subtype=0", "/clips/cam@2x.mp4",
                                 "C:\\clips\\a.mp4", "redis:frames:cam", "http://[::1]:8080/v.m3u8",
                                 "hls+https://cdn.example.com/live/index.m3u8", "rtsp://cam.local/live#frag",
                                 "redis://127.0.0.1:6379/0#frames:camera-north-entrance"])
def test_redact_url_leaves_what_holds_no_credential(url):
    assert redact_url(url) == url


def test_redact_text_assignments_and_headers():
    out = redact_text("failed: password=hunter2 token: 'abc123' Authorization: Bearer eyJsecret api_key=K3Y")
    for s in ("hunter2", "abc123", "eyJsecret", "K3Y"):
        assert s not in out, out
    for plain in ("42 tests passed: 3 s", "http://host:8080/x failed, ask admin@corp.example"):
        assert redact_text(plain) == plain


def test_a_malformed_password_is_never_quoted_by_an_error():
    """urllib's "Port could not be cast to integer value as 'hunter'" quoted a piece of the password (in the stream's
    reason, events, the API and the fleet's records); an '@' past the host of an RTSP URL (hunter#2@host) is refused
    as ambiguous without quoting it."""
    for url in ("rtsp://admin:hunter#2@127.0.0.1:9/cam", "rtsp://admin:hunter?2@127.0.0.1:9/cam",
                "rtsp://admin:hunter/2@127.0.0.1:9/cam", "rtsp://admin:1234#hunter@127.0.0.1:9/cam"):
        with pytest.raises(SourceError) as e:
            parse_reference(url)
        assert "hunter" not in str(e.value) and e.value.permanent, e.value
        with pytest.raises(ApiError) as a:
            check_authority(url)
        assert "hunter" not in str(a.value.message) + str(a.value.details), a.value

    async def pin():
        with pytest.raises(EgressError) as e:
            await StreamEgress(EgressRules(), "s").pin_url("rtsp://admin:hunter#2@127.0.0.1:9/cam")
        assert "hunter" not in str(e.value), e.value
    asyncio.run(pin())


def test_tracebacks_in_the_log_show_no_local_variable(capsys):
    """The console renderer's rich traceback printed every frame's local variables (url = 'rtsp://admin:hunter#2@...');
    a traceback is now plain text, without locals, and redacted like the rest of the line."""
    try:
        for fmt in ("console", "json"):
            setup_logging("info", fmt)
            log = get_logger("test")

            def fails(url: str) -> None:
                secret_local = "l0calS3cret"  # noqa: F841 - shown by a traceback with locals
                raise RuntimeError(f"cannot open {url}")

            try:
                fails("rtsp://admin:hunter#2@127.0.0.1:9/cam?X-Amz-Signature=deadbeefsig")
            except RuntimeError:
                log.exception("stream failed", url="http://h/v.m3u8?X-Amz-Credential=AKIAEXAMPLE",
                              extra={"password": "nested5ecret", "urls": ["rtsp://u:l1stpw@h/x"]})
            err = capsys.readouterr().err
            assert "stream failed" in err and "RuntimeError" in err, err
            for s in ("hunter", "deadbeefsig", "l0calS3cret", "AKIAEXAMPLE", "nested5ecret", "l1stpw"):
                assert s not in err, (fmt, s, err)
    finally:
        setup_logging("info", "console")  # as conftest set it


# -- end to end: a fleet of two daemons ------------------------------------------------------------------------------

E2E = {  # all on loopback port 9 (nothing listens): the config file's own hosts are trusted by the egress policy
    "leak-hash": "rtsp://admin:hunter#2@127.0.0.1:9/cam",
    "leak-s3": "http://127.0.0.1:9/v.m3u8?X-Amz-Credential=AKIAEXAMPLE&X-Amz-Signature=deadbeefsig"
               "&x-amz-security-token=FQoGsecrettoken",
    "leak-enc": "rtsp://camuser:s3cr3t%40pw@127.0.0.1:9/cam?jwt=eyJsecretjwt",
    "leak-tok": "rtsp://127.0.0.1:9/live;password=semic0lonpw?token=t0psecrettoken&channel=1",
}
SECRETS = ("hunter", "AKIAEXAMPLE", "deadbeefsig", "FQoGsecrettoken", "camuser", "s3cr3t", "eyJsecretjwt",
           "semic0lonpw", "t0psecrettoken")


def fleet_cfg(redis_url, name, streams=(), **fleet):
    c = api_cfg(redis_url, streams)
    return c.model_copy(update={"fleet": c.fleet.model_copy(update={
        "enabled": True, "member_id": name, "lease_ttl_s": 3, "renew_s": 0.5, "settle_s": 1, **fleet})})


def _leaks(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


async def test_no_credential_in_events_api_member_record_metrics_or_log(redis_server, capsys):
    """Streams whose URLs hold credentials (a password with '#', presigned S3 parameters, a percent-encoded '@', a
    JWT, ';' and query tokens) on daemon x of a fleet: x's events in Redis, GET /api/v1/streams/{id} through x (the
    owner) and through y (from x's member record), the member record itself, both daemons' /metrics and the log
    hold no piece of any of them (old code: the password-with-'#' URL whole in the member record and y's answer,
    "hunter" in the reason, the X-Amz values in the log and everywhere the URL is shown). A POST of such a URL is
    refused without quoting it."""
    r = aioredis.Redis.from_url(redis_server.url)
    sids = list(E2E)

    async def clean():
        await r.delete(API_STREAMS_KEY, FLEET_MEMBERS_KEY, keys.fleet_member_key("x"), keys.fleet_member_key("y"))
        for sid in [*sids, "leak-post"]:
            await r.delete(keys.events_key(sid), keys.lease_key(sid), keys.lease_last_key(sid),
                           keys.results_key(sid), keys.stream_ended_key(sid))
    await clean()
    streams = [{"id": sid, "url": u, "pipeline": "frame_info", "reconnect": {"max_attempts": None}}
               for sid, u in E2E.items()]
    try:
        async with running(fleet_cfg(redis_server.url, "x", streams)) as dx, \
                running(fleet_cfg(redis_server.url, "y")) as dy, aiohttp.ClientSession() as s:
            await until(lambda: set(dx.streams.runners) == set(sids), 15, what="x runs them all")

            async def failed_once():  # every stream has failed (or backed off) at least once, with its reason
                return all(rn.reason for rn in dx.streams.runners.values())
            await until(failed_once, 10, what="a reason for every stream")

            async def in_record():
                raw = await r.get(keys.fleet_member_key("x"))
                return raw.decode() if raw and all(sid in raw.decode() for sid in sids) and \
                    raw.decode().count('"url"') >= len(sids) else None
            record = await until(in_record, 10, what="x's member record with the URLs")
            assert not _leaks(record), (_leaks(record), record)
            assert "127.0.0.1:9" in record and "***" in record

            for sid in sids:
                evs = await r.xrange(keys.events_key(sid))
                text = repr(evs)
                assert evs and not _leaks(text), (sid, _leaks(text), text)
                for d in (dx, dy):
                    async def answered(d=d, sid=sid):  # y answers from x's member record once it has read it
                        async with s.get(d.api_url + f"/api/v1/streams/{sid}", headers=h(READ)) as resp:
                            return await resp.text() if resp.status == 200 else None
                    body = await until(answered, 10, what=f"GET {sid}")
                    assert not _leaks(body), (d is dx, sid, _leaks(body), body)
                    assert "127.0.0.1:9" in body, body
                async with s.get(dx.api_url + f"/api/v1/streams/{sid}/events", headers=h(READ)) as resp:
                    body = await resp.text()
                assert not _leaks(body), (sid, _leaks(body), body)
            reason = dx.streams.runners["leak-hash"].reason
            assert reason and "percent-encoded" in reason, reason

            for d in (dx, dy):
                async with s.get(d.api_url + "/metrics", headers=h(READ)) as resp:
                    body = await resp.text()
                assert resp.status == 200 and not _leaks(body), (_leaks(body), body[:2000])
                async with s.get(d.api_url + "/api/v1/streams", headers=h(READ)) as resp:
                    body = await resp.text()
                assert not _leaks(body), (_leaks(body), body)

            for url in ("rtsp://admin:hunter#2@127.0.0.1:9/x", "rtsp://admin:hunter?2@cam.example/x",
                        "http://127.0.0.1:9/v.m3u8?X-Amz-Signature=deadbeefsig"):
                async with s.post(dy.api_url + "/api/v1/streams", headers=h(ADMIN),
                                  json={"id": "leak-post", "url": url}) as resp:
                    body = await resp.text()
                assert resp.status in (201, 422) and not _leaks(body), (url, resp.status, body)
                if resp.status == 201:  # admitted (a loopback address is allowed here): its answer was checked
                    assert "X-Amz-Signature=***" in body, body
                    async with s.delete(dy.api_url + "/api/v1/streams/leak-post", headers=h(ADMIN)) as resp:
                        assert resp.status == 204, await resp.text()
                else:
                    assert "percent-encoded" in body, body
    finally:
        await clean()
        await r.aclose()
    out = capsys.readouterr()
    log = out.err + out.out
    assert "stream added" in log and "stream state" in log, log[-2000:]
    assert not _leaks(log), (_leaks(log), [ln for ln in log.splitlines() if _leaks(ln)][:10])


@pytest.mark.parametrize("url", ["https://cdn.example.com/videos/@channel/live.m3u8",
                                 "https://cdn.example.com:8443/img/logo@2x/index.m3u8",
                                 "rtmp://203.0.113.5/live/cam@1"])
def test_an_at_sign_in_a_path_is_not_user_information(url):
    """4839b77 took everything up to the URL's last '@' as user information: the host of a CDN path with '@' was
    hidden (`https://***@channel/...`)."""
    assert redact_url(url) == url
    assert url_secrets(url) == []


@pytest.mark.parametrize(("url", "text"), [
    ("rtsp://user:s3cretpw@cam.local/stream1", "user stopped the stream; it passes no segment"),
    ("http://cam.local/video.cgi?resolution=1280x720&encoder=h264&channel=1", "decoder h264 failed: h264 error"),
    ("rtsp://admin:hunter2@cam.local/live", "the administrator's hunter2x was fine"),  # only whole words
])
def test_scrub_leaves_ordinary_words_and_codec_names(url, text):
    assert scrub(text, url_secrets(url)) == text
    assert "s3cretpw" not in scrub("login s3cretpw refused", url_secrets("rtsp://user:s3cretpw@cam.local/s"))


async def test_events_scrub_only_free_text_fields(r, redis_server):
    """The supervisor scrubbed every string field of an event: a URL whose user name is `failed` turned the state
    events' "to": "failed" into "***". Only reason-like fields are scrubbed now; the password never shows."""
    from conftest import events, make_config

    from streamd.redis_server import free_port

    url = f"rtsp://failed:s3cretpw@127.0.0.1:{free_port()}/cam"
    cfg = make_config(redis_server.url, [{"id": "scrubev", "url": url, "open_timeout_s": 1,
                                         "reconnect": {"initial_s": 0.05, "max_s": 0.05, "max_attempts": 1}}])
    async with running(cfg) as d:
        await until(lambda: d.streams.runners["scrubev"].state.value == "failed", 20, what="failed")
    evs = await events(r, "scrubev", "state")
    assert evs[-1]["to"] == "failed", evs
    assert "s3cretpw" not in str(evs)

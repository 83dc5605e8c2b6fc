"""The config loader on its own: YAML files, STREAMD_<SECTION>_<KEY> overrides, errors that name the bad key's path,
and no unknown key accepted anywhere."""

import pytest

from streamd.cli import main
from streamd.config import DropPolicy, load_config, parse_config
from streamd.errors import ConfigError


def write(tmp_path, text: str, name: str = "c.yaml"):
    f = tmp_path / name
    f.write_text(text)
    return f


def key_of(data=None, environ=None, path=None) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, environ or {}) if path is not None else parse_config(data, environ or {})
    assert str(e.value).startswith(f"{e.value.key}: "), str(e.value)  # the message leads with the key's path
    return e.value.key


def test_a_yaml_file_with_defaults_filled_in(tmp_path):
    f = write(tmp_path, """
redis:
  url: redis://cache:6380/2
  publish_batch: 32
streams:
  - id: cam-1
    url: rtsp://cam.example/live
    fps: 2.5
    reconnect: {max_attempts: null}
""")
    cfg = load_config(f, environ={})
    assert cfg.redis.url == "redis://cache:6380/2" and cfg.redis.publish_batch == 32
    assert cfg.redis.buffer_max_records == 10_000  # a default
    (s,) = cfg.streams
    assert (s.id, s.url, s.fps, s.pipeline) == ("cam-1", "rtsp://cam.example/live", 2.5, "default")
    assert s.reconnect.max_attempts is None and s.reconnect.initial_s == 0.5 and s.drop_policy is None
    assert cfg.pipelines_dir is None  # no pipelines/ folder next to the file


def test_a_pipelines_folder_next_to_the_file_is_used(tmp_path):
    (tmp_path / "pipelines").mkdir()
    assert load_config(write(tmp_path, "streams: []\n"), {}).pipelines_dir == str(tmp_path / "pipelines")
    f = write(tmp_path, "pipelines_dir: /elsewhere\n", "d.yaml")
    assert load_config(f, {}).pipelines_dir == "/elsewhere"  # a file's own setting wins


def test_environment_overrides_win_over_the_file_and_are_typed(tmp_path):
    f = write(tmp_path, "redis:\n  url: redis://a:1/0\n  publish_batch: 8\napi:\n  enabled: false\n")
    cfg = load_config(f, {"STREAMD_REDIS_URL": "redis://b:2/0", "STREAMD_REDIS_PUBLISH_BATCH": "128",
                          "STREAMD_API_ENABLED": "true", "STREAMD_API_PORT": "9999",
                          "STREAMD_SHUTDOWN_GRACE_S": "2.5", "STREAMD_REDIS_CONSUMER": "",
                          "STREAMD_LOG_FORMAT": "json"})
    assert cfg.redis.url == "redis://b:2/0" and cfg.redis.publish_batch == 128
    assert cfg.api.enabled is True and cfg.api.port == 9999 and cfg.shutdown.grace_s == 2.5
    assert cfg.redis.consumer is None and cfg.log.format == "json"  # "" is null


def test_only_streamd_section_variables_count(monkeypatch):
    # not config sections: the ONNX cache folder, an unknown section, a bare prefix; other prefixes are not ours
    environ = {"STREAMD_CACHE_DIR": "/tmp/x", "STREAMD_NOSUCH_KEY": "1", "STREAMD_": "1", "STREAMD_REDIS": "x",
               "REDIS_URL": "redis://other:1/0"}
    cfg = parse_config({}, environ)
    assert cfg.redis.url is None and cfg.model_dump() == parse_config({}, {}).model_dump()
    monkeypatch.setenv("STREAMD_REDIS_RESULTS_MAXLEN", "77")  # environ=None reads the process environment
    assert parse_config({}).redis.results_maxlen == 77


def test_a_mapping_in_a_variable_stays_a_string_and_is_refused_where_a_number_is_wanted():
    assert key_of(environ={"STREAMD_REDIS_PUBLISH_BATCH": "{a: 1}"}) == "redis.publish_batch"
    assert key_of(environ={"STREAMD_LOG_LEVEL": "loud"}) == "log.level"


@pytest.mark.parametrize("data, key", [
    ({"bogus": 1}, "bogus"),
    ({"redis": {"urll": "redis://x"}}, "redis.urll"),
    ({"streams": [{"id": "a", "url": "x.mp4", "fsp": 2}]}, "streams.0.fsp"),
    ({"streams": [{"id": "a", "url": "x.mp4"}, {"id": "b", "url": "y.mp4", "reconnect": {"tries": 3}}]},
     "streams.1.reconnect.tries"),
    ({"streams": [{"id": "a", "url": "x.mp4", "redis_input": {"block_ms": 9000}}]}, "streams.0.redis_input.block_ms"),
    ({"streams": [{"id": "a", "url": "x.mp4", "fps": -1}]}, "streams.0.fps"),
    ({"streams": [{"id": "..", "url": "x.mp4"}]}, "streams.0.id"),
    ({"streams": [{"id": "a", "url": "x.mp4"}, {"id": "a", "url": "y.mp4"}]}, "streams"),
    ({"redis": {"buffer_max_records": 0}}, "redis.buffer_max_records"),
    ({"api": {"enabled": True, "bind": "0.0.0.0"}}, "api.tokens"),  # beyond loopback without tokens
])
def test_a_bad_or_unknown_key_is_named_by_its_path(data, key):
    assert key_of(data) == key


def test_an_unknown_key_from_the_environment_is_refused_too():
    assert key_of(environ={"STREAMD_REDIS_BOGUS": "1"}) == "redis.bogus"


def test_file_errors_name_the_file_or_the_root(tmp_path):
    assert key_of(path=tmp_path / "missing.yaml") == "<file>"
    assert key_of(path=write(tmp_path, "redis: [unclosed\n")) == "<file>"
    assert key_of(path=write(tmp_path, "- a list\n", "l.yaml")) == "<root>"
    assert key_of(path=write(tmp_path, "redis: 3\n", "s.yaml")) == "redis"


def test_enums_take_their_documented_values():
    s = parse_config({"streams": [{"id": "a", "url": "x.mp4", "drop_policy": "drop_oldest"}]}, {}).streams[0]
    assert s.drop_policy is DropPolicy.DROP_OLDEST
    assert key_of({"streams": [{"id": "a", "url": "x.mp4", "drop_policy": "newest"}]}) == "streams.0.drop_policy"


def test_validate_exits_2_naming_the_key_path(tmp_path, capsys):
    f = write(tmp_path, "streams:\n  - id: a\n    url: x.mp4\n    reconnect:\n      tries: 3\n")
    assert main(["validate", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("streamd: invalid config: streams.0.reconnect.tries: "), err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback


def test_a_redis_cluster_needs_a_url():
    """The embedded redis-server is a single server: `redis.cluster` without `redis.url` is refused at start."""
    with pytest.raises(ConfigError) as e:
        parse_config({"redis": {"cluster": True}}, environ={})
    assert e.value.key == "redis" and "redis.url" in str(e.value)
    assert parse_config({"redis": {"cluster": True, "url": "redis://127.0.0.1:7000"}}, environ={}).redis.cluster

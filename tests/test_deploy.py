"""The deploy files say what they must: several daemons in fleet mode, hand-over on stop, egress policy on, probes
on the health endpoints, and configs streamd itself accepts."""

from pathlib import Path

import yaml

from streamd.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def _k8s() -> dict[str, dict]:
    docs = [d for d in yaml.safe_load_all((ROOT / "deploy/k8s/streamd.yaml").read_text()) if d]
    return {f"{d['kind']}/{d['metadata']['name']}": d for d in docs}


def test_k8s_runs_three_daemons_in_fleet_mode_with_a_hand_over_on_stop(tmp_path):
    k = _k8s()
    cfg_file = tmp_path / "streamd.yaml"
    cfg_file.write_text(k["ConfigMap/streamd-config"]["data"]["streamd.yaml"])
    cfg = load_config(cfg_file, environ={"STREAMD_ADMIN_TOKEN": "x" * 32})
    assert cfg.fleet.enabled and cfg.egress.deny_non_global and cfg.api.deny_private_addresses
    assert cfg.api.tokens  # the API binds 0.0.0.0: tokens are required
    dep = k["Deployment/streamd"]["spec"]
    assert dep["replicas"] >= 3
    pod = dep["template"]["spec"]
    (c,) = pod["containers"]
    pause = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > cfg.shutdown.grace_s + pause
    env = {e["name"]: e for e in c["env"]}
    assert env["STREAMD_FLEET_MEMBER_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert c["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/health/live"
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 120  # a model load
    pdb = k["PodDisruptionBudget/streamd"]["spec"]
    assert pdb["selector"] == dep["selector"] and pdb["maxUnavailable"] == 1
    assert "Service/redis" in k and "Service/streamd" in k


def test_compose_runs_redis_and_three_daemons_sharing_the_streams():
    compose = yaml.safe_load((ROOT / "deploy/compose.yaml").read_text())
    svc = compose["services"]["streamd"]
    assert svc["deploy"]["replicas"] == 3 and "redis" in compose["services"]
    assert svc["ports"][0].startswith("127.0.0.1:")  # published on loopback only
    cfg = load_config(ROOT / "config/compose.yaml", environ={"STREAMD_ADMIN_TOKEN": "x" * 32,
                                                             **svc["environment"]})
    assert cfg.fleet.enabled and cfg.egress.deny_non_global and cfg.api.tokens
    assert int(svc["stop_grace_period"].rstrip("s")) > cfg.shutdown.grace_s

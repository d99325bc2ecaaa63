"""deploy/afdserve-lws.yaml is what deploy/lws.py renders, and every flag in it is afdserve's:
each pod's command is planned for its LWS index with the entry point's own parser, the front's
flags go through `afdserve serve`'s parser and EngineConfig, the workers' through `afdserve
worker`'s parser and WorkerConfig; the probes hit routes the server has, on its port."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]


def _lws_module():
    spec = importlib.util.spec_from_file_location("deploy_lws", ROOT / "deploy" / "lws.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _server_routes() -> set[str]:
    """The routes of the real app (built on stand-ins: nothing starts until its lifespan)."""
    from afdserve.config import EngineConfig
    from afdserve.server.api import build_app

    engine = SimpleNamespace(max_model_len=64, state=lambda: None, vocab_size=100)
    app = build_app(engine, SimpleNamespace(vocab_size=100), EngineConfig())
    return {r.path for r in app.routes}


def _check_group(docs: list[dict], attention: int, ffn: int) -> None:
    from afdserve.cli import build_parser
    from afdserve.launch.torchrun_cli import plan
    from afdserve.launch.worker import WorkerConfig, config_from_args
    from afdserve.server.cli import serve_config

    lws, service = docs
    assert (lws["apiVersion"], lws["kind"]) == ("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
    tmpl = lws["spec"]["leaderWorkerTemplate"]
    size = tmpl["size"]
    assert size == 1 + attention + ffn
    assert tmpl["restartPolicy"] in ("None", "RecreateGroupOnPodRestart")
    name = lws["metadata"]["name"]
    assert service["spec"]["selector"] == {
        "leaderworkerset.sigs.k8s.io/name": name,
        "leaderworkerset.sigs.k8s.io/worker-index": "0",
    }
    leader_addr = f"{name}-0.{name}.default"
    parser = build_parser()
    roles_seen = []
    for index in range(size):
        template = tmpl["leaderTemplate"] if index == 0 else tmpl["workerTemplate"]
        (container,) = template["spec"]["containers"]
        env_from = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
        assert env_from == {"AFDSERVE_HOST": "status.podIP"}
        cmd = container["command"]
        assert cmd[:3] == ["python", "-m", "afdserve.launch.torchrun"]
        env = {
            "LWS_LEADER_ADDRESS": leader_addr,
            "LWS_GROUP_SIZE": str(size),
            "LWS_WORKER_INDEX": str(index),
            "AFDSERVE_HOST": f"10.0.0.{index + 1}",
        }
        p = plan(cmd[3:], env)  # the entry point's parser, and `afdserve serve`'s for after --
        roles_seen.append(p.role)
        ns = parser.parse_args(["serve", *p.argv] if p.role == "front" else list(p.argv))
        if p.role == "front":
            cfg = serve_config(ns)  # the whole EngineConfig validates
            assert (cfg.attention_workers, cfg.ffn_workers) == (attention, ffn)
            assert cfg.front == "10.0.0.1:29600" and cfg.transport in ("tcp", "torch")
            events, controls, store = cfg.front_addresses
            wanted = {int(a.rpartition(":")[2]) for a in [events, *controls, store]}
            declared = {q["containerPort"] for q in container["ports"]}
            assert wanted | {ns.port} == declared
            routes = _server_routes()
            probes = {k: container[k]["httpGet"] for k in container if k.endswith("Probe")}
            assert set(probes) == {"startupProbe", "readinessProbe", "livenessProbe"}
            for probe in probes.values():
                assert probe["port"] == ns.port and probe["path"] in routes
            assert probes["readinessProbe"]["path"] == "/health"
            # /health is 503 while no attention worker serves: a liveness probe on it would
            # kill the front in the middle of a recovery
            assert probes["livenessProbe"]["path"] != "/health"
        else:
            from afdserve.launch.cli import WORKER_FLAGS

            values = {f.replace("-", "_"): getattr(ns, f.replace("-", "_")) for f in WORKER_FLAGS}
            wcfg = config_from_args(SimpleNamespace(**values))
            assert isinstance(wcfg, WorkerConfig)
            assert wcfg.front == f"{leader_addr}:29600" and wcfg.host == env["AFDSERVE_HOST"]
            assert not any(k.endswith("Probe") for k in container)  # never killed mid-recovery
    want = ["front", *(f"attention{k}" for k in range(attention)), *(f"ffn{j}" for j in range(ffn))]
    assert roles_seen == want


def test_committed_manifest_is_what_the_renderer_gives():
    lws = _lws_module()
    assert (ROOT / "deploy" / "afdserve-lws.yaml").read_text() == lws.render([])


def test_committed_manifest_uses_only_afdserve_flags():
    text = (ROOT / "deploy" / "afdserve-lws.yaml").read_text()
    _check_group(list(yaml.safe_load_all(text)), 2, 1)


def test_other_shapes_render_and_check():
    lws = _lws_module()
    argv = ["--attention", "3", "--ffn", "2", "--transport", "torch", "--name", "big"]
    argv += ["--restart-policy", "RecreateGroupOnPodRestart", "--serve-arg=--batch-invariant"]
    _check_group(list(yaml.safe_load_all(lws.render(argv))), 3, 2)


def test_a_flag_the_cli_does_not_know_fails_the_check():
    """The check is real: one unknown serve flag in the manifest fails it."""
    from afdserve.errors import UserInputError

    lws = _lws_module()
    docs = list(yaml.safe_load_all(lws.render(["--serve-arg=--no-such-flag"])))
    with pytest.raises(UserInputError, match="not `afdserve serve`'s"):
        _check_group(docs, 2, 1)

"""Scale-out pieces that need no Ray cluster: the metrics merge (against each replica's own
parsed exposition), the settings that switch Ray on, the deployment options, the error
without the extra, and that the plain server never imports Ray."""

from __future__ import annotations

import subprocess
import sys

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import ServerMetrics
from server.metrics_merge import merge_expositions
from server.settings import ServerSettings


def _samples(text: str) -> set[tuple[str, tuple, float]]:
    return {(s.name, tuple(sorted(s.labels.items())), s.value)
            for family in text_string_to_metric_families(text) for s in family.samples}


def _busy_metrics(seed: int) -> ServerMetrics:
    m = ServerMetrics()
    m.http_requests.labels("/v1/reason", "POST", "200").inc(3 + seed)
    m.http_requests.labels("/v1/reason", "POST", "503").inc(seed)
    m.ttft.observe(0.05 * (seed + 1))
    m.finished.labels("stop").inc(2)
    m.bind_engine(lambda: seed, lambda: 2 * seed + 1)
    return m


def test_merge_labels_every_sample_with_its_replica_and_loses_none():
    texts = {"r-a": _busy_metrics(1).render().decode(), "r-b": _busy_metrics(4).render().decode()}
    merged = merge_expositions(texts)
    expected = set()
    for replica, text in texts.items():   # the oracle: each replica's own samples, relabelled
        for name, labels, value in _samples(text):
            expected.add((name, tuple(sorted({**dict(labels), "replica": replica}.items())), value))
    assert _samples(merged) == expected
    # HELP / TYPE once per family, however many replicas
    assert merged.count("# TYPE coconut_num_requests_running gauge") == 1
    assert 'coconut_num_requests_running{replica="r-b"} 9.0' in merged


def test_merge_replaces_a_replica_label_already_present_and_handles_nothing():
    text = '# HELP x_total a\n# TYPE x_total counter\nx_total{replica="old",k="v"} 2.0\n'
    merged = merge_expositions({"new": text})
    assert _samples(merged) == {("x_total", (("k", "v"), ("replica", "new")), 2.0)}
    assert merge_expositions({}) == ""


@pytest.mark.parametrize("fields, uses", [
    ({}, False), ({"replicas": 1}, False), ({"replicas": 2}, True),
    ({"replicas": 1, "ray_address": "auto"}, True), ({"autoscale": "1:3"}, True)])
def test_which_settings_deploy_on_ray(fields, uses):
    assert ServerSettings(**fields).uses_ray() is uses


@pytest.mark.parametrize("value", ["3", "a:b", "4:2", "0:0", ":3", "1:"])
def test_autoscale_must_be_min_colon_max(value):
    with pytest.raises(ValueError, match="MIN:MAX"):
        ServerSettings(autoscale=value)


def test_deployment_options_keep_backpressure_in_the_engine_and_autoscale_on_the_knob():
    from server.ray_serve import deployment_options

    fixed = deployment_options(ServerSettings(replicas=3, max_batch_size=8, max_queue=16, torch_threads=2,
                                              num_gpus_per_replica=0.5, drain_timeout_s=42))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["max_ongoing_requests"] > 8 + 16          # Ray never queues before our 503
    assert fixed["ray_actor_options"] == {"num_cpus": 2, "num_gpus": 0.5}
    assert fixed["graceful_shutdown_timeout_s"] == 42
    scaled = deployment_options(ServerSettings(autoscale="1:4", max_batch_size=8))
    assert "num_replicas" not in scaled
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 1,
                                            "target_ongoing_requests": 8}
    knob = deployment_options(ServerSettings(autoscale="2:4", autoscale_target_ongoing_requests=3))
    assert knob["autoscaling_config"]["target_ongoing_requests"] == 3
    assert knob["autoscaling_config"]["initial_replicas"] == 2


def test_replicas_without_the_extra_is_an_error_that_names_it(monkeypatch):
    from server import ray_serve

    monkeypatch.setitem(sys.modules, "ray", None)   # import ray -> ImportError
    with pytest.raises(RuntimeError, match=r'pip install -e "\.\[ray\]"'):
        ray_serve.require_ray()


def test_the_single_server_path_never_imports_ray():
    code = ("import sys; from server.app import create_app; from server.cli import settings_from_args; "
            "create_app(); assert 'ray' not in sys.modules, 'ray was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_serve_flags_exist_for_scale_out():
    out = subprocess.run([sys.executable, "-m", "engine.cli", "serve", "--help"], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    for flag in ("--replicas", "--ray-address", "--num-gpus-per-replica", "--autoscale",
                 "--autoscale-target-ongoing-requests"):
        assert flag in out

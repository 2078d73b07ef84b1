"""The deployment files, checked without a container runtime (none exists on these machines):
hadolint on the Dockerfile, the Kubernetes overlays rendered by kustomize and validated against
the Kubernetes schemas, the compose file against the compose schema, the dashboard and alert rules
parsed, and every metric they (and the autoscaling rule) read present on a live server."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
METRIC = re.compile(r"\b((?:tritonllm|nv_inference)_[a-z0-9_]+)\b")


def run(*cmd, **kw):
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kw)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.openai"])
def test_dockerfiles_pass_hadolint(dockerfile):
    r = run(BIN / "hadolint", DEPLOY / dockerfile)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_kustomize_overlay_renders_valid_kubernetes_objects(overlay, tmp_path):
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with kustomize) is part of this machine's image: install it to check deploy/kubernetes"
    r = run(kubectl, "kustomize", DEPLOY / "kubernetes" / "overlays" / overlay)
    assert r.returncode == 0, r.stderr
    docs = [d for d in yaml.safe_load_all(r.stdout) if d]
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "PodMonitor",
        "PersistentVolumeClaim",
    }
    standard = tmp_path / "standard.yaml"
    standard.write_text(yaml.safe_dump_all([d for d in docs if d["kind"] != "PodMonitor"]))
    v = run(BIN / "kubernetes-validate", "--strict", standard)
    assert v.returncode == 0, v.stdout + v.stderr
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"] for p in container["ports"]}
    assert {p["port"] for p in kinds["PodMonitor"]["spec"]["podMetricsEndpoints"]} <= ports
    assert {p["targetPort"] for p in kinds["Service"]["spec"]["ports"]} <= ports
    assert container["lifecycle"]["preStop"]["exec"]["command"][1] == "/opt/tritonllm/drain.py"
    assert pod["terminationGracePeriodSeconds"] > 90 + 15  # the drain, then Triton's exit timeout
    assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])  # /dev/shm
    assert ("nvidia.com/gpu" in container["resources"]["limits"]) == (overlay == "gpu")
    if overlay == "gpu":  # the tuned kernel tables (tuning_cache "auto") outlive a container restart
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["XDG_CACHE_HOME"] in {m["mountPath"] for m in container["volumeMounts"]}


def test_the_prestop_drain_runs_on_the_standard_library_alone():
    """The image copies tritonllm/triton/drain.py alone (nothing of tritonllm is installed there):
    it must start without site-packages; the harness's stop() runs the same code in every test."""
    r = run(sys.executable, "-I", "-S", ROOT / "tritonllm" / "triton" / "drain.py", "--help")
    assert r.returncode == 0 and "--timeout-s" in r.stdout, r.stderr
    assert "COPY tritonllm/triton/drain.py /opt/tritonllm/drain.py" in (DEPLOY / "Dockerfile").read_text()


def test_compose_file_matches_the_compose_schema():
    r = run(BIN / "check-jsonschema", "--builtin-schema", "vendor.compose-spec", DEPLOY / "docker-compose.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    for service in compose["services"].values():
        assert all(str(p).startswith("127.0.0.1:") for p in service.get("ports", [])), service  # loopback only


def referenced_metrics() -> dict[str, set[str]]:
    """Metric names each monitoring file reads, from its PromQL expressions."""
    dashboard = json.loads((DEPLOY / "observability" / "grafana" / "dashboards" / "tritonllm.json").read_text())
    alerts = yaml.safe_load((DEPLOY / "observability" / "prometheus" / "alerts.yml").read_text())
    adapter = yaml.safe_load((DEPLOY / "kubernetes" / "prometheus-adapter-rules.yaml").read_text())
    exprs = {
        "dashboard": [t["expr"] for p in dashboard["panels"] for t in p["targets"]],
        "alerts": [r["expr"] for g in alerts["groups"] for r in g["rules"]],
        "autoscaling": [q for r in adapter["rules"]["custom"] for q in (r["seriesQuery"], r["metricsQuery"])],
    }
    return {name: {m for e in es for m in METRIC.findall(e)} for name, es in exprs.items()}


def test_dashboard_alerts_and_autoscaling_rule_parse_and_read_metrics():
    names = referenced_metrics()
    assert all(names.values()), names
    dashboard = json.loads((DEPLOY / "observability" / "grafana" / "dashboards" / "tritonllm.json").read_text())
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])


def test_every_metric_the_monitoring_reads_exists_on_a_live_server(live_server):
    """After traffic (requests finished, a rejected one for the error and failure series), every
    name the dashboard, the alerts and the autoscaling rule read is on Triton's /metrics."""
    from tritonllm.client import GenerationError, LLMClient
    from tritonllm.triton.scrape import metric_samples

    with LLMClient(live_server.grpc_url, "tiny", timeout_s=60) as c:
        c.generate("monitoring", max_tokens=4, temperature=0.0)
        with pytest.raises(GenerationError):
            c.generate("bad", max_tokens=0)
    on_page = {name for name, _, _ in metric_samples(live_server.metrics())}
    for source, names in referenced_metrics().items():
        assert names <= on_page, f"{source} reads metrics the server does not export: {sorted(names - on_page)}"

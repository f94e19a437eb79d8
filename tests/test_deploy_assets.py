"""Checks of the deployment assets under deploy/.

Prometheus rules and config go through promtool (the Debian package ``prometheus``): skipped when it
is missing on a developer machine, a failure when ``CI`` is set. The rest needs only PyYAML: the
Grafana dashboard and the rules may reference only this project's metrics and recording rules, the
Kubernetes PrometheusRule must carry the rule file's groups unchanged, every alert is documented and
unit-tested both firing and quiet, and every stop timeout outlasts the agent's drain grace.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROM = DEPLOY / "prometheus"
RULES = PROM / "rules" / "node-agent.rules.yml"
RULE_TESTS = PROM / "tests" / "node-agent.rules.test.yml"
PROM_CONFIG = PROM / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "node-agent.json"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
DEFAULT_GRACE_S = 30.0  # shutdown.grace_s default

# The metric names the agent and the scheduler export (histograms also as _bucket/_sum/_count).
AGENT_METRICS = {
    "node_agent_build_info",
    "node_agent_node_info",
    "node_agent_registered",
    "node_agent_heartbeat_last_success_timestamp_seconds",
    "node_agent_scheduler_requests_total",
    "node_agent_lone_worker_jobs_total",
    "node_agent_lone_worker_info",
    "node_agent_retries_total",
    "node_agent_lease_renewals_total",
    "node_agent_lease_lost_total",
    "node_agent_leases_held",
    "node_agent_jobs_total",
    "node_agent_jobs_in_progress",
    "node_agent_asr_audio_seconds_total",
    "node_agent_asr_segments_total",
    "node_agent_asr_fallback_segments_total",
    "node_agent_worker_up",
    "node_agent_worker_restarts_total",
    "node_agent_worker_resident_memory_bytes",
    "node_agent_worker_jobs_served",
    "node_agent_worker_start_time_seconds",
    "node_agent_worker_model_load_seconds",
    "node_agent_worker_state",
    "node_agent_slot_info",
}
AGENT_HISTOGRAMS = {
    "node_agent_scheduler_request_duration_seconds",
    "node_agent_lease_acquire_duration_seconds",
    "node_agent_lease_renew_duration_seconds",
    "node_agent_lease_margin_seconds",
    "node_agent_job_duration_seconds",
    "node_agent_job_queue_wait_seconds",
    "node_agent_asr_segment_conversion_seconds",
    "node_agent_asr_segment_decode_seconds",
    "node_agent_asr_transcribe_call_seconds",
    "node_agent_asr_realtime_factor",
}
SCHEDULER_METRICS = {
    "node_agent_scheduler_queue_depth",
    "node_agent_scheduler_nodes",
    "node_agent_scheduler_leases_granted_total",
    "node_agent_scheduler_leases_renewed_total",
    "node_agent_scheduler_leases_expired_total",
    "node_agent_scheduler_jobs_total",
    "node_agent_scheduler_results_rejected_total",
    "node_agent_scheduler_jobs_requeued_total",
    "node_agent_scheduler_queued_jobs",
    "node_agent_scheduler_queue_oldest_wait_seconds",
    "node_agent_scheduler_nodes_cordoned",
    "node_agent_scheduler_jobs_cancelled_total",
    "node_agent_scheduler_sections_total",
}
SCHEDULER_HISTOGRAMS = {"node_agent_scheduler_queue_wait_seconds"}
KNOWN_METRICS = (
    AGENT_METRICS
    | SCHEDULER_METRICS
    | {f"{h}{suffix}" for h in AGENT_HISTOGRAMS | SCHEDULER_HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
    | {"up"}
)

REQUIRED_ALERTS = {
    "NodeAgentDown",
    "NodeAgentNotRegistered",
    "NodeAgentHeartbeatStale",
    "NodeAgentLeaseTimeouts",
    "NodeAgentLeaseMarginLow",
    "NodeAgentSlowSegmentConversion",
    "NodeAgentWorkerRestartLoop",
    "NodeAgentJobFailureRate",
    "NodeAgentWorkerFatal",
}

# ----- helpers ------------------------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def _load_all_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _rules() -> list[dict[str, Any]]:
    return [rule for group in _load_yaml(RULES)["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _recorded_names() -> set[str]:
    return {rule["record"] for rule in _rules() if "record" in rule}


_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or",
                 "unless", "atan2", "inf", "nan", "Inf", "NaN"}


def metric_names(expr: str) -> set[str]:
    """Metric names referenced by a PromQL expression (Grafana variables allowed)."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"'(?:[^'\\]|\\.)*'", "''", e)
    e = re.sub(r"\$\{[^}]*\}|\$\w+", "", e)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    # A whole identifier (not part of a number such as 1e3 or a duration such as 5m), not a call.
    for match in re.finditer(r"(?<![\w.:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()", e):
        if match.group(1) not in _PROMQL_WORDS:
            names.add(match.group(1))
    return names


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text(encoding="utf-8"))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def _dashboard_exprs() -> list[tuple[str, str]]:
    dash = _dashboard()
    out = [(p.get("title", "?"), t["expr"]) for p in _panels(dash["panels"]) for t in p.get("targets", [])]
    out += [(f"annotation {a['name']}", a["expr"]) for a in dash.get("annotations", {}).get("list", []) if "expr" in a]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", query) or re.fullmatch(
            r"\s*query_result\((.*)\)\s*", query
        )
        out.append((f"variable {var['name']}", m.group(1) if m else query))
    return out


def _grace_s() -> float:
    config = ROOT / "config" / "node-agent.yaml"
    if config.exists():
        data = _load_yaml(config) or {}
        return float((data.get("shutdown") or {}).get("grace_s", DEFAULT_GRACE_S))
    return DEFAULT_GRACE_S


def _systemd_values(path: Path, key: str) -> list[str]:
    return [
        line.split("=", 1)[1].strip()
        for line in path.read_text(encoding="utf-8").splitlines()
        if line.strip().startswith(f"{key}=")
    ]


def _k8s_docs() -> dict[tuple[str, str], dict[str, Any]]:
    """The manifests kustomize applies, plus the examples (``*.example.yaml``) an operator copies and edits."""
    docs = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in _load_all_yaml(path):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


# ----- promtool -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path:
        return path
    if os.environ.get("CI"):
        pytest.fail("promtool not found but CI is set: install it (apt-get install -y prometheus)")
    pytest.skip("promtool not installed (apt-get install -y prometheus); with CI set this fails instead")


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_promtool_check_rules(promtool: str) -> None:
    result = _run([promtool, "check", "rules", str(RULES)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_unit_tests(promtool: str) -> None:
    result = _run([promtool, "test", "rules", str(RULE_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_check_config(promtool: str) -> None:
    # Also checks the rule files it names and the file_sd target files.
    result = _run([promtool, "check", "config", str(PROM_CONFIG)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheusrule_groups_pass_promtool(promtool: str, tmp_path: Path) -> None:
    spec = _load_yaml(K8S / "prometheusrule.yaml")["spec"]
    rules_file = tmp_path / "from-prometheusrule.yml"
    rules_file.write_text(yaml.safe_dump({"groups": spec["groups"]}), encoding="utf-8")
    result = _run([promtool, "check", "rules", str(rules_file)])
    assert result.returncode == 0, result.stdout + result.stderr


# ----- rules --------------------------------------------------------------------------------------


def test_required_alerts_exist() -> None:
    names = {a["alert"] for a in _alerts()}
    assert REQUIRED_ALERTS <= names, f"missing alerts: {sorted(REQUIRED_ALERTS - names)}"
    assert len(names) == len(_alerts()), "duplicate alert names"


@pytest.mark.parametrize("alert", _alerts(), ids=lambda a: a["alert"])
def test_alert_is_documented(alert: dict[str, Any]) -> None:
    assert alert.get("labels", {}).get("severity") in {"critical", "warning", "info"}
    annotations = alert.get("annotations", {})
    assert annotations.get("summary", "").strip(), "no summary"
    description = annotations.get("description", "").strip()
    assert description, "no description"
    # The description must point the operator at something to look at: a metric or a setting.
    assert re.search(r"node_agent_\w+|\b[a-z_]+\.[a-z_]+\b", description), description


def test_every_alert_is_unit_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in _load_yaml(RULE_TESTS)["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {a["alert"] for a in _alerts()}
    assert names <= firing, f"alerts never shown firing: {sorted(names - firing)}"
    assert names <= quiet, f"alerts never shown quiet: {sorted(names - quiet)}"
    assert firing | quiet <= names, f"tests name unknown alerts: {sorted((firing | quiet) - names)}"


def test_recording_rules_are_unit_tested() -> None:
    tested = {
        name
        for case in _load_yaml(RULE_TESTS)["tests"]
        for check in case.get("promql_expr_test", [])
        for name in metric_names(check["expr"])
    }
    assert tested & _recorded_names(), "no promql_expr_test exercises a recording rule"


def test_rules_reference_only_known_metrics() -> None:
    recorded = _recorded_names()
    for rule in _rules():
        unknown = metric_names(rule["expr"]) - KNOWN_METRICS - recorded
        assert not unknown, f"{rule.get('alert') or rule.get('record')}: unknown metrics {sorted(unknown)}"


def _code_metrics() -> tuple[set[str], dict[str, set[str]]]:
    """Metric names and label values the agent's and the scheduler's registries really export."""
    agent_metrics = pytest.importorskip("node_agent.metrics")
    scheduler_metrics = pytest.importorskip("node_agent.scheduler.metrics")
    from prometheus_client import CollectorRegistry

    agent_registry, scheduler_registry = CollectorRegistry(), CollectorRegistry()
    agent = agent_metrics.AgentMetrics(agent_registry, version="test")
    agent.declare_device("gpu:0/0", "tiny.en")
    agent.declare_slot("gpu:0/0", "gpu:0", 4, True)
    scheduler_metrics.SchedulerMetrics(scheduler_registry, lambda: (0, {}))
    names: set[str] = set()
    values: dict[str, set[str]] = {}
    for registry in (agent_registry, scheduler_registry):
        for family in registry.collect():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
            names |= {family.name + suffix for suffix in suffixes}
            for sample in family.samples:
                for label, value in sample.labels.items():
                    values.setdefault(label, set()).add(value)
    return names, values


def test_known_metrics_are_what_the_code_exports() -> None:
    names, _ = _code_metrics()
    missing = KNOWN_METRICS - {"up"} - names
    assert not missing, f"rules/dashboard expect metrics the code does not export: {sorted(missing)}"


def test_rule_label_values_exist_in_the_code() -> None:
    _, values = _code_metrics()
    for rule in _rules():
        for label, regex in re.findall(r'\b(reason|outcome|state|result|priority)\s*(?:=~|!~|!=|=)\s*"([^"]*)"', rule["expr"]):
            for value in regex.split("|"):
                assert value in values.get(label, set()), (
                    f"{rule.get('alert') or rule.get('record')}: {label}={value!r} is never exported"
                )


def test_prometheusrule_matches_rule_file() -> None:
    rule = _load_yaml(K8S / "prometheusrule.yaml")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == _load_yaml(RULES)["groups"], (
        "deploy/k8s/prometheusrule.yaml differs from the rule file: run deploy/k8s/make-prometheusrule.py"
    )
    result = subprocess.run(
        [sys.executable, str(K8S / "make-prometheusrule.py"), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_metric_name_extraction() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le, instance) (rate(node_agent_x_bucket{instance=~"$instance", '
        'le!="1e3"}[$__rate_interval] offset 5m))) > 1e3 and on (instance) up{job="a b"} == bool 0 '
        "or time() - rec:node_agent_y:p90_5m"
    )
    assert metric_names(expr) == {"node_agent_x_bucket", "up", "rec:node_agent_y:p90_5m"}


# ----- Grafana ------------------------------------------------------------------------------------


def test_dashboard_structure() -> None:
    dash = _dashboard()
    assert dash["title"] and dash["uid"]
    assert 36 <= dash["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert {"instance", "model", "device"} <= set(variables)
    ids = [p["id"] for p in _panels(dash["panels"])]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    data_panels = [p for p in _panels(dash["panels"]) if p["type"] != "row"]
    assert len(data_panels) >= 15
    for panel in data_panels:
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        assert panel["datasource"]["uid"] in {"${DS_PROMETHEUS}", "prometheus"}, panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip(), panel["title"]
    exprs = " ".join(expr for _, expr in _dashboard_exprs())
    # The panels the operators asked for.
    for metric in (
        "node_agent_jobs_total",
        "node_agent_asr_realtime_factor",
        "node_agent_asr_segment_conversion_seconds",
        "node_agent_asr_fallback_segments_total",
        "node_agent_asr_segment_decode_seconds",
        "node_agent_lease_renew_duration_seconds",
        "node_agent_lease_margin_seconds",
        "node_agent_lease_lost_total",
        "node_agent_leases_held",
        "node_agent_worker_restarts_total",
        "node_agent_worker_state",
        "node_agent_worker_resident_memory_bytes",
        "node_agent_slot_info",
        "instance:node_agent_slots_busy:sum",
        "instance:node_agent_slots_ready:sum",
        "instance_physical_device:node_agent_worker_resident_memory_bytes:sum",
        "node_agent_jobs_in_progress",
        "node_agent_heartbeat_last_success_timestamp_seconds",
        "node_agent_scheduler_queue_depth",
        "node_agent_scheduler_nodes",
        "node_agent_scheduler_results_rejected_total",
        "node_agent_scheduler_queued_jobs",
        "node_agent_scheduler_queue_oldest_wait_seconds",
        "node_agent_scheduler_nodes_cordoned",
        "node_agent_scheduler_jobs_cancelled_total",
        "node_agent_scheduler_queue_wait_seconds_bucket",
    ):
        assert metric in exprs, f"no panel shows {metric}"


@pytest.mark.parametrize("where, expr", _dashboard_exprs(), ids=lambda v: str(v)[:60])
def test_dashboard_references_only_project_metrics(where: str, expr: str) -> None:
    recorded = _recorded_names()
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    for name in names:
        assert name.startswith("node_agent_") or name in recorded or name == "up", f"{where}: {name}"
        assert name in KNOWN_METRICS or name in recorded, f"{where}: {name} is not an exported metric"


def test_grafana_provisioning() -> None:
    providers = _load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "node-agent.yml")
    assert providers["apiVersion"] == 1
    assert all(p["options"]["path"] for p in providers["providers"])
    sources = _load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    assert sources["apiVersion"] == 1
    prom = [d for d in sources["datasources"] if d["type"] == "prometheus"]
    assert prom and prom[0]["uid"] == "prometheus" and prom[0]["url"] == "http://prometheus:9090"


# ----- systemd, Kubernetes, Docker ----------------------------------------------------------------


def test_systemd_stop_timeout_outlasts_drain() -> None:
    unit = SYSTEMD / "node-agent.service"
    (timeout,) = _systemd_values(unit, "TimeoutStopSec")
    assert float(timeout.rstrip("s")) > _grace_s()
    assert _systemd_values(unit, "KillSignal") == ["SIGTERM"]
    # SIGTERM to the agent alone, so the worker finishes its job instead of dying with the agent.
    assert _systemd_values(unit, "KillMode") == ["mixed"]
    (exec_start,) = _systemd_values(unit, "ExecStart")
    assert exec_start == "/opt/node-agent/.venv/bin/node-agent run --config /etc/node-agent/node-agent.yaml"
    assert _systemd_values(unit, "EnvironmentFile") == ["-/etc/node-agent/env"]
    assert _systemd_values(unit, "StateDirectory") == ["node-agent"]
    (scheduler_exec,) = _systemd_values(SYSTEMD / "node-scheduler.service", "ExecStart")
    assert scheduler_exec.endswith("node-agent scheduler --listen 0.0.0.0:8470")


def test_systemd_healthcheck_restarts_an_agent_whose_healthz_fails() -> None:
    # The agent's /healthz turns 503 after every worker was fatal too long; under systemd a timer acts on it.
    service = SYSTEMD / "node-agent-healthcheck.service"
    text = service.read_text(encoding="utf-8")
    (listen,) = [v.split("=", 1)[1] for v in _systemd_values(SYSTEMD / "node-agent.service", "Environment")
                 if v.startswith("NODE_AGENT_HTTP__LISTEN=")]
    port = listen.rsplit(":", 1)[1]
    assert f"http://127.0.0.1:{port}/healthz" in text
    assert "systemctl is-active --quiet node-agent || exit 0" in text  # a stopped agent stays stopped
    assert "systemctl restart node-agent" in text
    assert _systemd_values(service, "Type") == ["oneshot"]
    timer = SYSTEMD / "node-agent-healthcheck.timer"
    assert _systemd_values(timer, "OnUnitActiveSec") == ["1min"]
    assert _systemd_values(timer, "WantedBy") == ["timers.target"]


def test_k8s_manifests() -> None:
    docs = _k8s_docs()
    kustomization = _load_yaml(K8S / "kustomization.yaml")
    for resource in kustomization["resources"]:
        assert (K8S / resource).exists(), resource
    examples = {p.name for p in K8S.glob("*.example.yaml")}
    listed = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"} - examples
    assert listed == set(kustomization["resources"]), "every manifest but the examples is in kustomization.yaml"

    pod = docs[("DaemonSet", "node-agent")]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > _grace_s()
    (agent,) = pod["containers"]
    assert agent["resources"]["limits"]["nvidia.com/gpu"] == 1
    env = {e["name"]: e for e in agent["env"]}
    assert env["NODE_AGENT_HTTP__LISTEN"]["value"] == "0.0.0.0:9464"
    assert env["NODE_AGENT_SCHEDULER__URL"]["value"].endswith(":8470")
    assert env["NODE_AGENT_SCHEDULER__TOKEN"]["valueFrom"]["secretKeyRef"]
    ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert agent["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert agent["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert ports[agent["livenessProbe"]["httpGet"]["port"]] == 9464
    mounts = {m["mountPath"] for m in agent["volumeMounts"]}
    assert {"/var/lib/node-agent", "/etc/node-agent"} <= mounts

    assert docs[("Service", "node-scheduler")]["spec"]["ports"][0]["port"] == 8470
    assert docs[("Service", "node-agent")]["spec"]["clusterIP"] == "None"
    # The alerts select these job names; prometheus-operator takes them from the Service names.
    monitors = {name for kind, name in docs if kind == "ServiceMonitor"}
    assert monitors == {"node-agent", "node-scheduler"}


def test_k8s_scheduler_is_replicated_on_a_secret_store() -> None:
    docs = _k8s_docs()
    deployment = docs[("Deployment", "node-scheduler")]
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    # A rolling update never takes both replicas down at once.
    assert spec["strategy"]["type"] == "RollingUpdate"
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 1
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][0] == "scheduler"
    env = {e["name"]: e for e in container["env"]}
    # The DSN carries a password: from a Secret, never a literal value.
    store = env["NODE_AGENT_SCHEDULER__STORE"]
    assert "value" not in store
    store_ref = store["valueFrom"]["secretKeyRef"]
    assert (store_ref["name"], store_ref["key"]) == ("node-scheduler-store", "dsn")
    assert not store_ref.get("optional"), "without the Secret the pods must not start (on a private SQLite each)"
    assert env["NODE_AGENT_SCHEDULER__TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "node-agent-scheduler-token"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"

    labels = spec["selector"]["matchLabels"]
    assert docs[("Service", "node-scheduler")]["spec"]["selector"] == labels
    pdb = docs[("PodDisruptionBudget", "node-scheduler")]
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["minAvailable"] == 1 and pdb["spec"]["selector"]["matchLabels"] == labels

    # The example Secret is named as the Deployment expects, is never applied by kustomize, and holds no
    # password anyone could leave in place unnoticed.
    example = K8S / "scheduler-store-secret.example.yaml"
    assert example.name not in _load_yaml(K8S / "kustomization.yaml")["resources"]
    secret = docs[("Secret", "node-scheduler-store")]
    dsn = secret["stringData"]["dsn"]
    assert dsn.startswith("postgresql://")
    assert "REPLACE" in dsn.split("@", 1)[0], dsn
    assert "scheduler-store-secret.example.yaml" in (DEPLOY / "README.md").read_text(encoding="utf-8")


def test_systemd_scheduler_reads_its_store_from_an_environment_file() -> None:
    unit = SYSTEMD / "node-scheduler.service"
    # Optional ("-"): absent means the SQLite default; read after the shared env file so the DSN there wins.
    assert _systemd_values(unit, "EnvironmentFile") == ["-/etc/node-agent/env", "-/etc/node-agent/scheduler.env"]
    assert not [v for v in _systemd_values(unit, "Environment") if v.startswith("NODE_AGENT_SCHEDULER__STORE=")]
    (state_dir,) = _systemd_values(unit, "StateDirectory")
    assert _systemd_values(unit, "Environment").count(f"NODE_AGENT_NODE__STATE_DIR=/var/lib/{state_dir}") == 1
    # The hardening stays.
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes"), ("User", "node-agent"), ("CapabilityBoundingSet", "")):
        assert _systemd_values(unit, key) == [value], key


def test_k8s_config_is_valid_for_the_agent(tmp_path: Path) -> None:
    config_mod = pytest.importorskip("node_agent.config")
    data = _load_yaml(K8S / "configmap.yaml")["data"]["node-agent.yaml"]
    pod = _k8s_docs()[("DaemonSet", "node-agent")]["spec"]["template"]["spec"]
    env = pod["containers"][0]["env"]
    # Secret and fieldRef values are unknown here; any string validates the key.
    environ = {e["name"]: e.get("value", "x") for e in env if e["name"].startswith("NODE_AGENT_")}
    for line in (SYSTEMD / "node-agent.service").read_text(encoding="utf-8").splitlines():
        if line.startswith("Environment=NODE_AGENT_"):
            key, value = line[len("Environment="):].split("=", 1)
            environ[key] = value
    path = tmp_path / "node-agent.yaml"
    path.write_text(data, encoding="utf-8")
    settings = config_mod.load_settings(path, environ=environ)
    assert settings.http.listen == "0.0.0.0:9464"
    assert settings.shutdown.grace_s < pod["terminationGracePeriodSeconds"]


def test_dockerfile() -> None:
    text = (DEPLOY / "docker" / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}|^FROM python:3\.11-slim", text, re.M)
    assert "python:3.11-slim" in text
    assert 'pip install ".[models]"' in text
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M), "must run as a non-root user"
    assert re.search(r"^EXPOSE 9464 8470$", text, re.M)
    assert 'ENTRYPOINT ["node-agent"]' in text
    assert 'CMD ["run", "--config", "/etc/node-agent/node-agent.yaml"]' in text
    healthcheck = re.search(r"^HEALTHCHECK .*\\\n\s*CMD (\[.*\])$", text, re.M)
    assert healthcheck, "no HEALTHCHECK instruction"
    probe = json.loads(healthcheck.group(1))
    assert probe[0] == "python" and "urllib" in probe[-1] and "/healthz" in text
    # Variables with the config prefix are read as settings; anything else must not use it.
    for name in re.findall(r"\b(NODE_AGENT_\w+)=", text):
        assert "__" in name, f"{name} is not a NODE_AGENT_<SECTION>__<KEY> override"

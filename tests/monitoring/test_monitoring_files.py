"""The shipped monitoring files (deploy/monitoring) as Prometheus' own tool judges them; the lab test runs them
against a real Prometheus."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"


def promtool(*args: str) -> str:
    result = subprocess.run(["promtool", *args], cwd=MONITORING, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_alert_rules_pass_their_unit_tests() -> None:
    promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts_test.yml")


def test_static_scrape_config_is_valid() -> None:
    promtool("check", "config", "scrape-config.yml")


def test_prometheusrule_carries_exactly_the_rules_file() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    manifest = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert manifest["apiVersion"] == "monitoring.coreos.com/v1" and manifest["kind"] == "PrometheusRule"
    assert manifest["spec"] == rules


def test_every_alert_rule_is_unit_tested() -> None:
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    tests = yaml.safe_load((MONITORING / "alerts_test.yml").read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    firing = {
        case["alertname"] for test in tests["tests"] for case in test["alert_rule_test"] if case.get("exp_alerts")
    }
    assert names == firing


def test_dashboard_covers_the_mesh_and_filters_by_node() -> None:
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["node"]["multi"] and variables["node"]["includeAll"]
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    for metric in (
        "warren_mesh_nodes",
        "warren_mesh_device_up",
        "warren_mesh_peer_receive_bytes_total",
        "warren_mesh_peer_transmit_bytes_total",
        "warren_mesh_peer_last_handshake_timestamp_seconds",
        "warren_mesh_convergence_lag_seconds_bucket",
        "warren_mesh_apply_errors_total",
        "warren_mesh_invalid_records",
        "warren_mesh_conflicting_records",
    ):
        assert any(metric in expr for expr in exprs), metric
    assert all('job="warren-mesh-agent"' in expr for expr in exprs)
    per_node = [expr for expr in exprs if "peer_" in expr]
    assert all('node=~"$node"' in expr for expr in per_node)
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))

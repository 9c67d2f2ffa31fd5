"""The shipped operations assets: docs/alerts.yml, docs/grafana-dashboard.json, docs/metrics.md.

Every query must name only metrics the exporters produce. With ``promtool`` on PATH
(Debian's ``prometheus`` package) the rules and every dashboard query are also checked
by Prometheus' own parser, and each alert is shown to fire, and to stay quiet, on
synthetic series with ``promtool test rules``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from celery_resilience.exporters import METRICS

DOCS = Path(__file__).resolve().parents[1] / "docs"
ALERTS = DOCS / "alerts.yml"
DASHBOARD = DOCS / "grafana-dashboard.json"

# Every series name a scrape can show: counters' _total, histograms' three, the gauge.
SERIES = {
    name
    for spec in METRICS.values()
    for name in (
        [spec.prometheus + suffix for suffix in ("_bucket", "_sum", "_count")]
        if spec.kind == "histogram"
        else [spec.prometheus]
    )
}

# PromQL words that look like metric names: aggregations, functions, keywords.
PROMQL_WORDS = {
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "group", "count_values", "by", "without", "on", "ignoring", "group_left", "group_right",
    "and", "or", "unless", "bool", "offset", "rate", "irate", "increase", "delta", "idelta",
    "deriv", "histogram_quantile", "vector", "scalar", "abs", "clamp_min", "clamp_max",
    "max_over_time", "min_over_time", "avg_over_time", "sum_over_time", "last_over_time",
    "absent", "absent_over_time", "changes", "resets", "time", "label_replace",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (label matchers, ranges and words removed)."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1", expr)
    expr = re.sub(r"\boffset\s+[0-9]+[smhdwy]", " ", expr)
    expr = re.sub(r"(?<![A-Za-z0-9_:])[0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?", " ", expr)
    return set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr)) - PROMQL_WORDS


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


def as_promql(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced, as Grafana sends it."""
    return expr.replace("$__rate_interval", "5m").replace("$task", ".*")


def promtool() -> str:
    executable = shutil.which("promtool")
    if executable is None:
        # .ci/run installs it; only a local run without it may skip.
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("promtool is not installed (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    assert executable is not None
    return executable


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_metric_name_extraction_finds_what_a_query_selects() -> None:
    """The checker itself: names behind matchers, offsets and label lists are found."""
    expr = (
        'sum by (task, le) (rate(foo_total{reason="x y", task=~"$task"}[5m] offset 1h)) '
        "/ ignoring(le) bar_count > 0.5 * 3e2"
    )
    assert metric_names(expr) == {"foo_total", "bar_count"}


def test_alert_rules_name_only_metrics_that_exist() -> None:
    """Each alert expression selects at least one metric, and only metrics we export."""
    for rule in alert_rules():
        names = metric_names(rule["expr"])
        assert names, rule["alert"]
        assert names <= SERIES, f"{rule['alert']}: unknown {sorted(names - SERIES)}"


def test_alert_rules_cover_what_operators_must_hear_about() -> None:
    """Retries climbing, dead letters, a growing DLQ, quarantines, lock contention and
    lost worker nodes."""
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert set(rules) == {
        "CeleryResilienceRetriesClimbing",
        "CeleryResilienceDeadLetters",
        "CeleryResilienceDLQGrowing",
        "CeleryResilienceCrashBudgetQuarantine",
        "CeleryResilienceLockContention",
        "CeleryResilienceNodeLost",
    }
    assert 'reason="worker_lost"' in rules["CeleryResilienceCrashBudgetQuarantine"]["expr"]
    for rule in rules.values():
        assert rule["labels"]["severity"] in {"warning", "critical"}
        assert rule["annotations"]["summary"]
        assert rule["annotations"]["description"]


def test_dashboard_queries_name_only_metrics_that_exist() -> None:
    """Every panel has a query; every query selects only metrics we export."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    for title, expr in dashboard_queries():
        names = metric_names(expr)
        assert names, title
        assert names <= SERIES, f"{title}: unknown {sorted(names - SERIES)}"


def test_dashboard_shows_every_metric() -> None:
    """No exported metric is left off the dashboard."""
    shown = set().union(*(metric_names(expr) for _, expr in dashboard_queries()))
    for spec in METRICS.values():
        assert any(name.startswith(spec.prometheus) for name in shown), spec.prometheus


def test_metrics_page_documents_every_metric_under_both_names() -> None:
    """docs/metrics.md names each metric as Prometheus and as OpenTelemetry see it."""
    page = (DOCS / "metrics.md").read_text()
    for spec in METRICS.values():
        assert f"`{spec.prometheus}`" in page
        assert f"`{spec.otel}`" in page


def test_alert_rules_pass_promtool() -> None:
    """Prometheus' own parser accepts the rules and their templates."""
    checked = run_promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in checked.stdout


def test_dashboard_queries_pass_promtool(tmp_path: Path) -> None:
    """Every dashboard query parses as PromQL (checked as recording rules)."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{n}", "expr": as_promql(expr)}
                    for n, (_, expr) in enumerate(dashboard_queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = run_promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


# Synthetic series at one sample per minute, and which alerts they must (not) raise.
ALERT_TESTS = """
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      # +1/min for 7 h, then +60/min: climbing. A steady 1/s task is not.
      - series: 'celery_resilience_retries_total{task="t.hot",reason="exception",instance="w1"}'
        values: '0+1x420 420+60x40'
      - series: 'celery_resilience_retries_total{task="t.busy",reason="exception",instance="w1"}'
        values: '0+60x460'
      # A first dead letter at 20 min; an old count that does not move.
      - series: 'celery_resilience_dead_letters_total{task="t.bad",reason="error",instance="w1"}'
        values: '_x20 1x440'
      - series: 'celery_resilience_dead_letters_total{task="t.old",reason="error",instance="w1"}'
        values: '5x460'
      # Quarantined at 30 min, seen by this worker first.
      - series: 'celery_resilience_dead_letters_total{task="t.poison",reason="worker_lost"}'
        values: '_x30 1x430'
      # Two workers report the same growing DLQ; another stays flat.
      - series: 'celery_resilience_dlq_entries{task="t.bad",instance="w1"}'
        values: '0+1x460'
      - series: 'celery_resilience_dlq_entries{task="t.bad",instance="w2"}'
        values: '0+1x460'
      - series: 'celery_resilience_dlq_entries{task="t.old",instance="w1"}'
        values: '50x460'
      # 2 contended attempts/s; 0.5/s stays below the threshold.
      - series: 'celery_resilience_lock_contended_total{task="t.locked",instance="w1"}'
        values: '0+120x460'
      - series: 'celery_resilience_lock_contended_total{task="t.calm",instance="w1"}'
        values: '0+30x460'
      # A node lost at 50 min, counted by the worker that recovered it (its first sample).
      - series: 'celery_resilience_nodes_lost_total{instance="w2"}'
        values: '_x50 1x410'
    alert_rule_test:
      - eval_time: 455m
        alertname: CeleryResilienceRetriesClimbing
        exp_alerts:
          - exp_labels: {severity: warning, task: t.hot}
      - eval_time: 400m
        alertname: CeleryResilienceRetriesClimbing
        exp_alerts: []
      - eval_time: 25m
        alertname: CeleryResilienceDeadLetters
        exp_alerts:
          - exp_labels: {severity: warning, task: t.bad, reason: error}
      - eval_time: 60m
        alertname: CeleryResilienceDeadLetters
        exp_alerts: []
      - eval_time: 90m
        alertname: CeleryResilienceDLQGrowing
        exp_alerts:
          - exp_labels: {severity: warning, task: t.bad}
      - eval_time: 35m
        alertname: CeleryResilienceCrashBudgetQuarantine
        exp_alerts:
          - exp_labels: {severity: critical, task: t.poison}
      - eval_time: 60m
        alertname: CeleryResilienceCrashBudgetQuarantine
        exp_alerts: []
      - eval_time: 40m
        alertname: CeleryResilienceLockContention
        exp_alerts:
          - exp_labels: {severity: warning, task: t.locked}
      - eval_time: 45m
        alertname: CeleryResilienceNodeLost
        exp_alerts: []
      - eval_time: 55m
        alertname: CeleryResilienceNodeLost
        exp_alerts:
          - exp_labels: {severity: warning}
      - eval_time: 90m
        alertname: CeleryResilienceNodeLost
        exp_alerts: []
"""


def test_alerts_fire_on_the_failures_they_describe_and_only_then(tmp_path: Path) -> None:
    """promtool test rules: each alert fires on its scenario and not on the quiet series."""
    document = yaml.safe_load(ALERTS.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations")  # promtool compares them; their text is not under test
    rules = tmp_path / "alerts.yml"
    rules.write_text(yaml.safe_dump(document))
    tests = tmp_path / "alerts-test.yml"
    tests.write_text(f"rule_files: [{json.dumps(str(rules))}]\n{ALERT_TESTS}")
    tested = run_promtool("test", "rules", str(tests))
    assert tested.returncode == 0, tested.stdout + tested.stderr

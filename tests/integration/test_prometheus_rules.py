"""deploy/prometheus against the real promtool, and the runbooks every alert links to.

promtool checks the configuration and lints the rule files; `promtool test rules` runs the unit
tests in deploy/prometheus/tests. This module also checks those unit tests cover every alert
(fires, stays quiet, resolves, no data) and every recording rule, that every alert follows the
annotation conventions of contracts.md §4, and that every alert rpowatch or Prometheus can raise
has a runbook.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy" / "prometheus"
RULE_FILES = sorted((PROMETHEUS / "rules").glob("*.yml"))
TEST_FILES = sorted((PROMETHEUS / "tests").glob("*.test.yml"))
RUNBOOKS = ROOT / "docs" / "runbooks"
RULE_PACK = ROOT / "rules" / "packs" / "default.yaml"
RUNBOOK_BASE = "https://github.com/rpowatch/rpowatch/blob/main/docs/runbooks"

# contracts.md §4, the alert catalogue.
CATALOGUE = {
    "ReplicationRPOBreach": "critical",
    "ReplicationRPOAtRisk": "warning",
    "ReplicationMissedCycles": "warning",
    "ReplicationResyncRequired": "critical",
    "ReplicationNotReplicating": "critical",
    "BackupRPOBreach": "critical",
    "VMUnprotected": "warning",
    "BackupJobsFailing": "warning",
    "RestoreTestOverdue": "warning",
    "FailoverTestOverdue": "warning",
    "RetentionNonCompliant": "warning",
    "ReplicaIOPSHeadroomLow": "warning",
    "ReplicationLinkSaturated": "warning",
    "NodeHeartbeatLost": "critical",
    "ClusterFailoverCapacityInsufficient": "warning",
    "StoragePathConcentration": "warning",
    "SourceClockSkew": "warning",
    "IngestStalled": "critical",
}
# Need state rpowatch does not export as metrics (documented in deploy/prometheus/README.md).
RPOWATCH_ONLY = {
    "ReplicationResyncRequired",
    "ReplicationNotReplicating",
    "BackupJobsFailing",
    "RetentionNonCompliant",
    "StoragePathConcentration",
    "SourceClockSkew",
}
# About rpowatch itself, Prometheus-side only.
META = {
    "RpowatchDown": "critical",
    "RpowatchEvaluationStalled": "critical",
    "RpowatchAlertmanagerNotificationsFailing": "warning",
    "Watchdog": "info",
}
# Alerts that must fire when there is no data at all (that is what they are for).
FIRE_WITHOUT_DATA = {"RpowatchDown", "Watchdog"}
RUNBOOK_SECTIONS = ("## Meaning", "## Likely causes", "## What to check", "## What to do")


def _tool(name: str) -> str:
    found = shutil.which(name) or f"/usr/bin/{name}"
    assert Path(found).exists(), f"{name} is missing: run scripts/install-test-deps"
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool("promtool"), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)


def _load(path: Path) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    return document


def _rules(kind: str) -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in RULE_FILES:
        for group in _load(path)["groups"]:
            for rule in group["rules"]:
                if kind in rule:
                    yield path, rule


def _alert_names() -> set[str]:
    return {rule["alert"] for _, rule in _rules("alert")}


# --- promtool ---------------------------------------------------------------------------------


def test_rule_files_pass_promtool_lint() -> None:
    assert RULE_FILES, "no rule files"
    checked = _run("check", "rules", "--lint=all", "--lint-fatal", *map(str, RULE_FILES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    for path in RULE_FILES:
        count = sum(len(g["rules"]) for g in _load(path)["groups"])
        assert f"SUCCESS: {count} rules found" in checked.stdout, (path.name, checked.stdout)


def test_prometheus_config_is_valid_and_loads_the_rule_files() -> None:
    config = PROMETHEUS / "prometheus.yml"
    checked = _run("check", "config", str(config))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    document = _load(config)
    (job,) = [job for job in document["scrape_configs"] if job["job_name"] == "rpowatch"]
    assert job["static_configs"][0]["targets"]
    loaded = {Path(f).name for f in document["rule_files"]}
    # Recording and meta alerts always; the catalogue mirror is opt-in (commented out).
    assert loaded == {"rpowatch-recording.yml", "rpowatch-meta-alerts.yml"}
    assert "# - rules/rpowatch-alerts.yml" in config.read_text()


def test_promtool_unit_tests_pass() -> None:
    assert TEST_FILES, "no promtool unit tests"
    tested = _run("test", "rules", *map(str, TEST_FILES))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert tested.stdout.count("SUCCESS") == len(TEST_FILES), tested.stdout


def test_every_rule_file_has_unit_tests() -> None:
    tested = {
        (path.parent / rule_file).resolve() for path in TEST_FILES for rule_file in _load(path)["rule_files"]
    }
    assert tested == {path.resolve() for path in RULE_FILES}


# --- what the unit tests cover ------------------------------------------------------------------


def _alert_cases() -> Iterator[tuple[str, list[str], dict[str, Any]]]:
    """(test group name, its input series, alert test case) over every unit-test file."""
    for path in TEST_FILES:
        for group in _load(path)["tests"]:
            series = [s["series"] for s in group.get("input_series") or []]
            for case in group.get("alert_rule_test") or []:
                yield group.get("name", ""), series, case


def _duration_s(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)", value))


def _firing(case: dict[str, Any]) -> set[frozenset[tuple[str, str]]]:
    return {frozenset(a.get("exp_labels", {}).items()) for a in case.get("exp_alerts") or []}


@pytest.mark.parametrize("alert", sorted(set(CATALOGUE) - RPOWATCH_ONLY | set(META)))
def test_unit_tests_cover_every_alert(alert: str) -> None:
    cases = [(group, series, case) for group, series, case in _alert_cases() if case["alertname"] == alert]
    assert cases, f"{alert} has no promtool unit test"
    # Fires.
    assert any(_firing(case) for _, _, case in cases), f"{alert}: never expected to fire"
    # No data: a test group without input series.
    no_data = [case for _, series, case in cases if not series]
    assert no_data, f"{alert}: no test without data"
    if alert in FIRE_WITHOUT_DATA:
        assert all(_firing(case) for case in no_data if _duration_s(case["eval_time"]) >= 120), alert
    else:
        assert all(not _firing(case) for case in no_data), alert
    if alert == "Watchdog":
        return  # it never stops firing
    # Does not fire although its metrics are there.
    assert any(series and not _firing(case) for _, series, case in cases), f"{alert}: no quiet case with data"
    # Resolves: something firing at one time is gone from the same group later.
    by_group: dict[str, list[dict[str, Any]]] = {}
    for group, series, case in cases:
        if series:
            by_group.setdefault(group, []).append(case)
    resolved = False
    for group_cases in by_group.values():
        ordered = sorted(group_cases, key=lambda c: _duration_s(c["eval_time"]))
        for i, earlier in enumerate(ordered):
            if any(_firing(earlier) - _firing(later) for later in ordered[i + 1 :]):
                resolved = True
    assert resolved, f"{alert}: no test where a firing alert resolves"


def test_unit_tests_cover_every_recording_rule() -> None:
    tested: set[str] = set()
    for path in TEST_FILES:
        for group in _load(path)["tests"]:
            for case in group.get("promql_expr_test") or []:
                if case.get("exp_samples"):
                    tested.add(case["expr"].strip())
    recorded = {rule["record"] for _, rule in _rules("record")}
    assert recorded, "no recording rules"
    assert recorded <= tested, f"recording rules without a unit test: {sorted(recorded - tested)}"


# --- conventions --------------------------------------------------------------------------------


def test_alert_rules_mirror_the_catalogue_and_document_the_rest() -> None:
    mirrored = {rule["alert"] for path, rule in _rules("alert") if path.name == "rpowatch-alerts.yml"}
    meta = {rule["alert"] for path, rule in _rules("alert") if path.name == "rpowatch-meta-alerts.yml"}
    assert mirrored == set(CATALOGUE) - RPOWATCH_ONLY
    assert meta == set(META)
    readme = (PROMETHEUS / "README.md").read_text()
    only_section = readme.split("### rpowatch-only", 1)[1]
    for alert in RPOWATCH_ONLY:
        assert f"`{alert}`" in only_section, f"{alert} is not documented as rpowatch-only"
    for alert in mirrored:
        assert f"| `{alert}` |" in readme, f"{alert} is not in the README's mirrored table"


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    expected = {**CATALOGUE, **META}
    for path, rule in _rules("alert"):
        name = rule["alert"]
        where = f"{path.name}: {name}"
        assert re.fullmatch(r"[A-Z][A-Za-z0-9]+", name), where
        assert rule["labels"]["severity"] == expected[name], where
        assert rule["labels"]["service"] == "rpowatch", where
        annotations = rule["annotations"]
        summary = annotations["summary"]
        assert "{{" not in summary and summary.endswith(".") and summary[0].isupper(), where
        assert annotations["description"].strip(), where
        assert annotations["runbook_url"] == f"{RUNBOOK_BASE}/{name}.md", where


def test_recording_rules_are_named_level_metric_operations() -> None:
    for _, rule in _rules("record"):
        level, metric, operations = rule["record"].split(":")
        assert re.fullmatch(r"[a-z_]*", level), rule["record"]
        assert metric.startswith("rpowatch_"), rule["record"]
        assert re.fullmatch(r"[a-z0-9_]+", operations), rule["record"]


# --- runbooks -----------------------------------------------------------------------------------


def _pack_alerts() -> set[str]:
    return {rule["alert"] for rule in _load(RULE_PACK)["rules"]}


@pytest.mark.parametrize("alert", sorted(set(CATALOGUE) | set(META)))
def test_every_alert_has_a_runbook(alert: str) -> None:
    page = RUNBOOKS / f"{alert}.md"
    assert page.exists(), f"docs/runbooks/{alert}.md is missing"
    text = page.read_text()
    assert text.startswith(f"# {alert}\n"), alert
    for section in RUNBOOK_SECTIONS:
        assert section in text, f"{alert}: no '{section}' section"
    assert f"[{alert}.md]({alert}.md)" in (RUNBOOKS / "README.md").read_text(), f"{alert} not in the runbook index"


def test_every_alert_rpowatch_or_prometheus_raises_has_a_runbook() -> None:
    """Also the rule pack's alerts as the rule pack grows: a new rule needs a runbook page."""
    alerts = _pack_alerts() | _alert_names()
    assert set(CATALOGUE) & _pack_alerts(), "the rule pack has no catalogue alert"
    missing = sorted(a for a in alerts if not (RUNBOOKS / f"{a}.md").exists())
    assert not missing, f"alerts without a runbook in docs/runbooks: {missing}"
    for rule in _load(RULE_PACK)["rules"]:
        assert rule["annotations"]["runbook_url"] == f"{{runbook_base}}/{rule['alert']}.md", rule["alert"]

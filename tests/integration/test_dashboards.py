"""The observability stack against a live rpowatch: dashboards, rules and the scrape itself.

rpowatch runs in-process (the `Service` of `rpowatch run`) fed by the fleet simulator with its
scripted incidents, as `rpowatch demo` does, plus what the simulator does not produce: a
restore test and a test failover per VM and a few undecodable records. A private real
Prometheus scrapes it every second with every rule file of deploy/prometheus loaded and sends
its alerts to a private real Alertmanager, which rpowatch posts its own alerts to as well.

Grafana is not available here, so each dashboard is checked the way Grafana would use it: its
template variables are resolved through Prometheus's label-values API, every panel query is run
and must return data, and every metric it names must exist in rpowatch's /metrics.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from ingest.contracts import Stream
from ingest.deadletter import MemoryDeadLetterSink
from ingest.memory import MemorySource
from rpowatch.config import settings_from
from rpowatch.demo import to_batches
from rpowatch.loading import load_rule_packs
from rpowatch.service import Service
from rpowatch.simulator import Emitted, FleetSimulator
from tests.harness import Alertmanager, HarnessError, Prometheus
from tests.harness.timing import record_timing

pytestmark = pytest.mark.integration
S = TypeVar("S", Alertmanager, Prometheus)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
RULE_FILES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
DATASOURCE = {"type": "prometheus", "uid": "rpowatch-prometheus"}
UIDS = {
    "rpowatch-fleet-rpo": "Fleet RPO compliance",
    "rpowatch-vm-drilldown": "VM drill-down",
    "rpowatch-replication-links": "Replication links & replica IOPS",
    "rpowatch-backups-tests": "Backups & tests",
    "rpowatch-self-health": "Self-health",
}
VMS = 300
STEP_S = 0.5
# Grafana's built-in variables, as Grafana would fill them for a 1 s scrape interval.
MACROS = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
METRIC = re.compile(r"(?<![\w:])rpowatch_[a-z0-9_]+(?![\w:])")
# What Prometheus 2.x sends when it scrapes (scrape/scrape.go, acceptHeader).
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def _dashboard(path: Path) -> dict[str, Any]:
    board: dict[str, Any] = json.loads(path.read_text())
    return board


def _panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in board["panels"]:
        if panel["type"] == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def _variable_query(variable: dict[str, Any]) -> str:
    query = variable["query"]
    text: str = query["query"] if isinstance(query, dict) else query
    return text


# --- the dashboards' JSON ---------------------------------------------------------------------


def test_dashboards_have_stable_uids_datasource_by_uid_and_units() -> None:
    boards = {_dashboard(path)["uid"]: (path, _dashboard(path)) for path in DASHBOARDS}
    assert set(boards) == set(UIDS), "the shipped dashboards and their uids are a contract: keep them"
    for uid, (path, board) in boards.items():
        assert path.name == f"{uid}.json"
        assert len(uid) <= 40 and re.fullmatch(r"[a-z0-9-]+", uid), uid
        assert board["id"] is None, f"{uid}: provisioned dashboards need id null"
        assert UIDS[uid] in board["title"], uid
        assert "rpowatch" in board["tags"]
        assert "__inputs" not in board and "${DS_" not in path.read_text(), f"{uid}: datasource by input"
        for variable in board["templating"]["list"]:
            assert variable["type"] == "query", (uid, variable["name"])
            assert variable["datasource"] == DATASOURCE, (uid, variable["name"])
        panels = list(_panels(board))
        assert panels, uid
        assert len({p["id"] for p in panels}) == len(panels), f"{uid}: panel ids repeat"
        for panel in panels:
            where = f"{uid}: {panel['title']}"
            assert panel["datasource"] == DATASOURCE, where
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{where}: no unit"
            assert panel.get("description"), f"{where}: no description"
            assert panel["targets"], where
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE, where
                assert target["expr"].strip(), where
            grid = panel["gridPos"]
            assert grid["x"] + grid["w"] <= 24, where


def test_provisioning_points_at_the_dashboards_uid() -> None:
    import yaml

    provisioning = ROOT / "deploy" / "grafana" / "provisioning"
    (source,) = yaml.safe_load((provisioning / "datasources" / "rpowatch.yaml").read_text())["datasources"]
    assert source["uid"] == DATASOURCE["uid"] and source["type"] == "prometheus"
    assert source["access"] == "proxy" and source["jsonData"]["httpMethod"] == "POST"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "rpowatch.yaml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"]


# --- the live stack ---------------------------------------------------------------------------


@dataclass
class Live:
    service: Service
    prometheus: Prometheus
    alertmanager: Alertmanager
    stalled_vm: str

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.service.port}/metrics"


def _run(label: str, service: S) -> Iterator[S]:
    """Start, yield and always close a private harness service, timing both (``yield from``)."""
    started = time.monotonic()
    try:
        service.start()
        record_timing(label, "start", time.monotonic() - started)
        yield service
    finally:
        stopping = time.monotonic()
        service.close()
        record_timing(label, "stop", time.monotonic() - stopping)


@pytest.fixture(scope="module")
def stack_alertmanager() -> Iterator[Alertmanager]:
    yield from _run("alertmanager (dashboards)", Alertmanager())


@pytest.fixture(scope="module")
def stack_prometheus(stack_alertmanager: Alertmanager) -> Iterator[Prometheus]:
    # Resend after 1 s: alerts fired before Prometheus discovered the Alertmanager are dropped
    # and by default only re-sent a minute later.
    prometheus = Prometheus(
        alertmanagers=[stack_alertmanager.url],
        rule_files=[str(p) for p in RULE_FILES],
        extra_flags=["--rules.alert.resend-delay=1s"],
    )
    yield from _run("prometheus (deploy rules)", prometheus)


def _tests_and_rejects(bootstrap: list[Emitted], now_ms: int) -> list[Emitted]:
    """A test failover and a restore test for every VM the simulator announced, and three
    records that cannot be decoded (the simulator produces neither)."""
    extra: list[Emitted] = []
    for e in bootstrap:
        event = json.loads(e.payload)
        if e.stream == Stream.REPLICATION:
            test = {k: event[k] for k in ("vm_id", "cluster_id", "target_id", "technology", "frequency_s")}
            test.update(event_id=f"tf-{event['vm_id']}", ts=now_ms - 3 * 86_400_000, kind="test_failover_completed")
            extra.append(Emitted(Stream.REPLICATION, e.key, e.node_id, json.dumps(test).encode()))
        elif e.stream == Stream.BACKUP:
            restore = {k: event[k] for k in ("vm_id", "cluster_id", "product", "level")}
            restore.update(event_id=f"rt-{event['vm_id']}", ts=now_ms - 20 * 86_400_000, job_id=f"rt-{event['vm_id']}",
                           kind="restore_test_succeeded")
            extra.append(Emitted(Stream.BACKUP, e.key, e.node_id, json.dumps(restore).encode()))
    first = bootstrap[0]
    extra += [Emitted(Stream.REPLICATION, first.key, first.node_id, b'{"event_id": "broken", "vm_id": 7')] * 3
    return extra


@pytest.fixture(scope="module")
async def live(stack_prometheus: Prometheus, stack_alertmanager: Alertmanager) -> AsyncIterator[Live]:
    settings = settings_from({
        "http": {"host": "127.0.0.1", "port": 0},
        "evaluation": {"heartbeat_timeout": "15s"},
        "alertmanager": {"urls": [stack_alertmanager.url], "resend_delay": "2s"},
    })
    source = MemorySource("simulator")
    started_ms = int(time.time() * 1000)
    simulator = FleetSimulator(VMS, start_ms=started_ms, seed=11)
    (stall,) = [i.entity for i in simulator.incidents if i.name == "replication-stall"]
    service = Service(settings, load_rule_packs(settings), [source], MemoryDeadLetterSink())
    await service.start()

    async def feed() -> None:
        first = True
        while True:
            now_ms = int(time.time() * 1000)
            emitted = simulator.step(now_ms)
            if first:
                emitted += _tests_and_rejects(emitted, now_ms)
                first = False
            for batch in to_batches(emitted, source.name, now_ms):
                await source.put(batch)
            await asyncio.sleep(STEP_S)

    feeder = asyncio.create_task(feed(), name="simulator")
    stack_prometheus.set_targets([f"127.0.0.1:{service.port}"])
    try:
        # Every VM scraped, several scrapes deep (so rates have samples), alerts in the table.
        await stack_prometheus.wait_for_async(
            "count(rpowatch_replication_rpo_target_seconds)", lambda r: bool(r) and r[0]["value"][1] == str(VMS), 30
        )
        await stack_prometheus.wait_for_async(
            "count_over_time(rpowatch_build_info[1m])", lambda r: bool(r) and float(r[0]["value"][1]) >= 4, 30
        )
        await stack_prometheus.wait_for_async("rpowatch_alerts", lambda r: bool(r), 30)
        yield Live(service, stack_prometheus, stack_alertmanager, stall)
    finally:
        feeder.cancel()
        await asyncio.gather(feeder, return_exceptions=True)
        stack_prometheus.set_targets([])
        await service.stop()


async def _query(prometheus: Prometheus, expr: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = (await asyncio.to_thread(prometheus.api, "query", [("query", expr)]))["result"]
    return result


async def _scrape(url: str, accept: str | None = None) -> tuple[str, str]:
    async with aiohttp.ClientSession() as session:
        async with session.get(url, headers={"Accept": accept} if accept else {}) as resp:
            assert resp.status == 200
            return resp.headers["Content-Type"], await resp.text()


async def _resolve_variables(prometheus: Prometheus, board: dict[str, Any], concrete: bool) -> dict[str, str]:
    """Each template variable's value as Grafana would substitute it: "All" (its allValue) for
    multi-value variables unless `concrete`, else the first value its query returns."""
    values: dict[str, str] = {}
    for variable in board["templating"]["list"]:
        query = _substitute(_variable_query(variable), values)
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
        assert match, f"{board['uid']}: variable {variable['name']}: unsupported query {query!r}"
        options = await asyncio.to_thread(prometheus.label_values, match.group(2), match.group(1))
        assert options, f"{board['uid']}: variable {variable['name']} ({query}) has no values"
        if variable.get("includeAll") and not concrete:
            values[variable["name"]] = variable.get("allValue") or "|".join(re.escape(o) for o in options)
        else:
            values[variable["name"]] = sorted(options)[0]
    return values


def _substitute(expr: str, variables: dict[str, str]) -> str:
    for macro, value in MACROS.items():
        expr = expr.replace(macro, value)
    # Longest names first, so $vm does not eat the start of a $vmx.
    for name in sorted(variables, key=len, reverse=True):
        expr = expr.replace(f"${{{name}}}", variables[name]).replace(f"${name}", variables[name])
    assert "$" not in expr, f"unresolved variable in {expr!r}"
    return expr


async def test_every_panel_query_returns_data(live: Live) -> None:
    failures: list[str] = []
    checked = 0
    for path in DASHBOARDS:
        board = _dashboard(path)
        for concrete in (False, True):
            variables = await _resolve_variables(live.prometheus, board, concrete)
            for panel in _panels(board):
                for target in panel["targets"]:
                    expr = _substitute(target["expr"], variables)
                    where = f"{board['uid']} / {panel['title']} / {target['refId']} ({variables})"
                    checked += 1
                    try:
                        result = await _query(live.prometheus, expr)
                    except HarnessError as exc:
                        failures.append(f"{where}: {exc}")
                        continue
                    if not result:
                        failures.append(f"{where}: no series for {expr}")
                    elif panel["fieldConfig"]["defaults"]["unit"] == "percentunit" and not any(
                        math.isfinite(float(s["value"][1])) for s in result
                    ):
                        failures.append(f"{where}: no finite ratio in {result}")
    assert checked > 100
    assert not failures, "\n".join(failures)


async def test_every_metric_a_dashboard_names_is_exported(live: Live) -> None:
    _, text = await _scrape(live.metrics_url)
    exported = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    named: dict[str, set[str]] = {}
    for path in DASHBOARDS:
        board = _dashboard(path)
        expressions = [t["expr"] for p in _panels(board) for t in p["targets"]]
        expressions += [_variable_query(v) for v in board["templating"]["list"]]
        for expr in expressions:
            for metric in METRIC.findall(expr):
                named.setdefault(metric, set()).add(board["uid"])
    assert len(named) >= 20, sorted(named)
    missing = {metric: sorted(uids) for metric, uids in named.items() if metric not in exported}
    assert not missing, f"dashboards name metrics rpowatch does not export: {missing}"


async def test_instance_counts_agree_with_the_per_vm_series_in_prometheus(live: Live) -> None:
    # Each pair is compared within one query, so both sides read the same scrape (a query sees
    # whole scrapes only): they must be equal exactly.
    pairs = {
        'sum(rpowatch_cluster_replication_vms{rpo!="unknown"})': "count(rpowatch_replication_rpo_target_seconds)",
        'sum(rpowatch_cluster_replication_vms{rpo="within"})': (
            "sum(rpowatch_replication_lag_seconds <= bool rpowatch_replication_rpo_target_seconds)"
        ),
        'sum(rpowatch_cluster_replication_vms{rpo="over"})': (
            "sum(rpowatch_replication_lag_seconds > bool rpowatch_replication_rpo_target_seconds)"
        ),
        'sum(rpowatch_cluster_replication_health_vms{state="warning"})': 'sum(rpowatch_replication_health{state="warning"})',
        'sum(rpowatch_cluster_replication_health_vms{state="critical"})': (
            'sum(rpowatch_replication_health{state="critical"})'
        ),
        'sum(rpowatch_cluster_backup_vms{rpo!="unknown"})': "count(rpowatch_backup_rpo_target_seconds)",
    }
    # Once the scripted stall has put a VM over its RPO, both sides of the RPO are counted.
    over = 'sum(rpowatch_cluster_replication_vms{rpo="over"})'
    await live.prometheus.wait_for_async(over, lambda r: bool(r) and float(r[0]["value"][1]) >= 1, timeout=60)
    for counted, per_vm in pairs.items():
        (difference,) = await _query(live.prometheus, f"({counted}) - ({per_vm})")
        if float(difference["value"][1]) != 0:
            sides = [await _query(live.prometheus, expr) for expr in (counted, per_vm)]  # for the message
            pytest.fail(f"{counted} - {per_vm} = {difference['value'][1]}; now {sides}")
    (total,) = await _query(live.prometheus, "sum(rpowatch_cluster_replication_vms)")
    assert float(total["value"][1]) == VMS


async def test_live_scrape_passes_promtool_check_metrics(live: Live) -> None:
    content_type, text = await _scrape(live.metrics_url)
    assert content_type.startswith("text/plain; version=0.0.4")
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    assert Path(promtool).exists(), "promtool is missing: run scripts/install-test-deps"
    checked = await asyncio.to_thread(
        subprocess.run, [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=120
    )
    assert checked.returncode == 0, (checked.stdout + checked.stderr).decode()
    assert text.count("rpowatch_replication_lag_seconds{") == VMS


async def test_live_scrape_negotiates_openmetrics_with_prometheus(live: Live) -> None:
    content_type, body = await _scrape(live.metrics_url, PROMETHEUS_ACCEPT)
    assert content_type.startswith("application/openmetrics-text; version=1.0.0")
    assert body.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(body)}
    assert families["rpowatch_build_info"].type == "gauge"
    assert families["rpowatch_events"].type == "counter"
    assert len(families["rpowatch_replication_lag_seconds"].samples) == VMS
    # The real Prometheus (which asks for OpenMetrics first) scrapes it without error.
    targets = await asyncio.to_thread(live.prometheus.api, "targets")
    (target,) = [t for t in targets["activeTargets"] if t["labels"]["job"] == "rpowatch"]
    assert target["health"] == "up" and target["lastError"] == "", target


async def test_deploy_rules_evaluate_cleanly_on_live_data(live: Live) -> None:
    async def rule_groups() -> list[dict[str, Any]]:
        groups: list[dict[str, Any]] = (await asyncio.to_thread(live.prometheus.api, "rules"))["groups"]
        return groups

    deadline = time.monotonic() + 20
    while True:
        rules = [rule for group in await rule_groups() for rule in group["rules"]]
        if rules and all(rule["health"] != "unknown" for rule in rules) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    expected = sum(1 for path in RULE_FILES for line in path.read_text().splitlines() if re.match(r"\s+- (alert|record):", line))
    assert len(rules) == expected
    broken = [(rule["name"], rule["health"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"]
    assert not broken, broken
    empty = [rule["name"] for rule in rules if rule["type"] == "recording" and not await _query(live.prometheus, rule["name"])]
    assert not empty, f"recording rules without a series on live data: {empty}"


async def test_prometheus_side_rules_catch_the_scripted_stall_like_rpowatch(live: Live) -> None:
    breach = f'ALERTS{{alertname="ReplicationRPOBreach",alertstate="firing",vm="{live.stalled_vm}"}}'
    await live.prometheus.wait_for_async(f"max_over_time({breach}[10m])", lambda r: len(r) == 1, timeout=60)
    # rpowatch's own evaluation raised the same breach (firing now, or resolved and retained).
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{live.service.port}/api/v1/alerts"
        async with session.get(url, params={"alertname": "ReplicationRPOBreach", "vm": live.stalled_vm}) as resp:
            own = await resp.json()
    assert [a["firedAt"] is not None for a in own] == [True], own


async def test_watchdog_and_rpowatch_alerts_reach_alertmanager(live: Live) -> None:
    def in_alertmanager() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        alerts = live.alertmanager.get_alerts()
        watchdog = [a for a in alerts if a["labels"]["alertname"] == "Watchdog"]
        # rpowatch's own alerts carry service="rpowatch" and no scrape labels.
        own = [a for a in alerts if a["labels"].get("service") == "rpowatch" and "job" not in a["labels"]
               and a["labels"]["alertname"] != "Watchdog"]
        return watchdog, own

    deadline = time.monotonic() + 30
    while True:
        watchdog, own = await asyncio.to_thread(in_alertmanager)
        if (watchdog and own) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert [a["labels"] for a in watchdog] == [{"alertname": "Watchdog", "severity": "info", "service": "rpowatch"}]
    assert own, "no alert of rpowatch's own evaluation reached Alertmanager"
    assert all(a["annotations"]["runbook_url"].endswith(f"/{a['labels']['alertname']}.md") for a in own)

"""deploy/alertmanager/alertmanager.yml against the real Alertmanager and amtool.

A private Alertmanager runs the shipped configuration with only two changes: every receiver
posts to a webhook server in this test (so which receiver got which notification is
observable), and group_wait/group_interval are 1 s. The routing tree, matchers, group_by,
receiver names and inhibit_rules are the shipped ones, byte for byte.
"""

from __future__ import annotations

import asyncio
import copy
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from exporters.alertmanager import rfc3339
from tests.harness import Alertmanager
from tests.harness.timing import record_timing

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
TIMING_KEYS = ("group_wait", "group_interval")
GRACE_S = 3.0  # after the expected notifications, how long unexpected ones get to show up


def _tool(name: str) -> str:
    found = shutil.which(name) or f"/usr/bin/{name}"
    assert Path(found).exists(), f"{name} is missing: run scripts/install-test-deps"
    return found


def _shipped() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(CONFIG.read_text())
    return config


def _routes(route: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield route
    for child in route.get("routes", []):
        yield from _routes(child)


def _for_test(config: dict[str, Any], webhook_base: str) -> dict[str, Any]:
    """The shipped configuration with receivers posting to `webhook_base/<receiver>` and fast
    grouping; nothing else changes (asserted)."""
    test = copy.deepcopy(config)
    for receiver in test["receivers"]:
        if any(key.endswith("_configs") for key in receiver):
            for key in [k for k in receiver if k.endswith("_configs")]:
                del receiver[key]
            receiver["webhook_configs"] = [{"url": f"{webhook_base}/{receiver['name']}", "send_resolved": True}]
    for route in _routes(test["route"]):
        for key in TIMING_KEYS:
            if key in route:
                route[key] = "1s"
    # Only receivers' integrations and the timings differ from what ships.
    def skeleton(c: dict[str, Any]) -> dict[str, Any]:
        c = copy.deepcopy(c)
        c["receivers"] = [r["name"] for r in c["receivers"]]
        for route in _routes(c["route"]):
            for key in TIMING_KEYS:
                route.pop(key, None)
        return c

    assert skeleton(test) == skeleton(config)
    return test


@dataclass
class Webhooks:
    """Notifications received, as (receiver from the URL path, webhook payload)."""

    base_url: str = ""
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def groups(self, receiver: str | None = None) -> list[tuple[str, dict[str, str], list[dict[str, Any]]]]:
        """(receiver, groupLabels, alerts) per notification, optionally of one receiver."""
        return [
            (name, payload["groupLabels"], payload["alerts"])
            for name, payload in self.received
            if receiver is None or name == receiver
        ]

    def about(self, **labels: str) -> list[tuple[str, dict[str, Any]]]:
        """(receiver, alert) for every notified alert whose labels include `labels`."""
        return [
            (name, alert)
            for name, payload in self.received
            for alert in payload["alerts"]
            if all(alert["labels"].get(k) == v for k, v in labels.items())
        ]


@pytest.fixture(scope="module")
async def webhooks() -> AsyncIterator[Webhooks]:
    hooks = Webhooks()

    async def receive(request: web.Request) -> web.Response:
        payload = await request.json()
        # The path names the receiver this config routed to; the payload must agree.
        assert payload["receiver"] == request.match_info["receiver"]
        hooks.received.append((request.match_info["receiver"], payload))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/{receiver}", receive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    hooks.base_url = f"http://127.0.0.1:{port}"
    try:
        yield hooks
    finally:
        await runner.cleanup()


@pytest.fixture(scope="module")
def routed_am(webhooks: Webhooks) -> Iterator[Alertmanager]:
    started = time.monotonic()
    am = Alertmanager(config=_for_test(_shipped(), webhooks.base_url))
    try:
        am.start()
        record_timing("alertmanager (deploy config)", "start", time.monotonic() - started)
        yield am
    finally:
        stopping = time.monotonic()
        am.close()
        record_timing("alertmanager (deploy config)", "stop", time.monotonic() - stopping)


def _alert(ends_in_s: float = 300.0, **labels: str) -> dict[str, Any]:
    now = time.time()
    return {
        "labels": {"service": "rpowatch", **labels},
        "annotations": {"summary": "Test alert.", "description": "posted by test_alertmanager_routing"},
        "startsAt": rfc3339(int((now - 60) * 1000)),
        "endsAt": rfc3339(int((now + ends_in_s) * 1000)),
    }


async def _post(am: Alertmanager, *alerts: dict[str, Any]) -> None:
    await asyncio.to_thread(am.post_alerts, list(alerts))


async def _until(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"{what}: not true after {timeout}s (last: {last!r})")


def _inhibited(am: Alertmanager, **labels: str) -> Callable[[], list[dict[str, Any]]]:
    """A check for `_until`: the alerts with these labels that are inhibited."""
    return lambda: [a for a in am.get_alerts(labels=labels) if a["status"]["inhibitedBy"]]


async def _status(am: Alertmanager, **labels: str) -> dict[str, Any]:
    """The one alert in Alertmanager with these labels."""
    (alert,) = await asyncio.to_thread(am.get_alerts, labels=labels)
    return alert


# --- static checks ----------------------------------------------------------------------------


def test_amtool_check_config_passes() -> None:
    checked = subprocess.run(
        [_tool("amtool"), "check-config", str(CONFIG)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS" in checked.stdout
    assert " - 3 inhibit rules" in checked.stdout
    assert " - 4 receivers" in checked.stdout


@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        ({"alertname": "ReplicationRPOBreach", "severity": "critical", "hci_cluster": "hci-a"}, "pager"),
        ({"alertname": "NodeHeartbeatLost", "severity": "critical", "hci_cluster": "hci-a"}, "pager"),
        ({"alertname": "ReplicationRPOAtRisk", "severity": "warning", "hci_cluster": "hci-a"}, "ticket"),
        ({"alertname": "RestoreTestOverdue", "severity": "warning", "hci_cluster": "hci-a"}, "ticket"),
        ({"alertname": "Watchdog", "severity": "info"}, "deadmansswitch"),
        ({"alertname": "SomethingInformational", "severity": "info"}, "null"),
        ({"alertname": "NoSeverity"}, "ticket"),
    ],
)
def test_amtool_routes_by_severity(labels: dict[str, str], receiver: str) -> None:
    routed = subprocess.run(
        [_tool("amtool"), "config", "routes", "test", f"--config.file={CONFIG}", *(f"{k}={v}" for k, v in labels.items())],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert routed.returncode == 0, routed.stdout + routed.stderr
    assert routed.stdout.split() == [receiver]


# --- the real Alertmanager --------------------------------------------------------------------


async def test_critical_pages_warning_tickets_grouped_by_alertname_and_instance(
    routed_am: Alertmanager, webhooks: Webhooks
) -> None:
    await _post(
        routed_am,
        _alert(alertname="ReplicationRPOBreach", severity="critical", vm="r-1", hci_cluster="hci-route", target="hci-x"),
        _alert(alertname="ReplicationRPOBreach", severity="critical", vm="r-2", hci_cluster="hci-route", target="hci-x"),
        _alert(alertname="BackupRPOBreach", severity="critical", vm="r-3", hci_cluster="hci-route"),
        _alert(alertname="ReplicationRPOAtRisk", severity="warning", vm="r-4", hci_cluster="hci-route", target="hci-x"),
        _alert(alertname="ReplicationRPOAtRisk", severity="warning", vm="r-5", hci_cluster="hci-route-2", target="hci-x"),
        _alert(alertname="Watchdog", severity="info"),
    )

    def route_groups() -> dict[tuple[str, str, str], set[str]]:
        return {
            (receiver, group["alertname"], group.get("hci_cluster", "")): {a["labels"].get("vm", "") for a in alerts}
            for receiver, group, alerts in webhooks.groups()
            if group.get("hci_cluster", "").startswith("hci-route") or group["alertname"] == "Watchdog"
        }

    expected = {
        ("pager", "ReplicationRPOBreach", "hci-route"): {"r-1", "r-2"},  # one notification, both VMs
        ("pager", "BackupRPOBreach", "hci-route"): {"r-3"},
        ("ticket", "ReplicationRPOAtRisk", "hci-route"): {"r-4"},
        ("ticket", "ReplicationRPOAtRisk", "hci-route-2"): {"r-5"},
        ("deadmansswitch", "Watchdog", ""): {""},
    }
    await _until(lambda: route_groups() == expected, "every group notified to its receiver")
    await asyncio.sleep(GRACE_S)
    assert route_groups() == expected
    # Exactly one notification per group, with the group labels of group_by.
    notified = [(r, g) for r, g, _ in webhooks.groups() if g.get("hci_cluster", "").startswith("hci-route")]
    assert sorted(r for r, _ in notified) == ["pager", "pager", "ticket", "ticket"]
    assert all(set(g) == {"alertname", "hci_cluster"} for _, g in notified)


async def test_node_heartbeat_lost_inhibits_replication_alerts_of_its_instance(
    routed_am: Alertmanager, webhooks: Webhooks
) -> None:
    node = _alert(alertname="NodeHeartbeatLost", severity="critical", hci_cluster="hci-nodes", node="hci-nodes-n2")
    inhibited = [
        _alert(alertname="ReplicationRPOBreach", severity="critical", vm="n-1", hci_cluster="hci-nodes", target="hci-x"),
        _alert(alertname="ReplicationRPOAtRisk", severity="warning", vm="n-2", hci_cluster="hci-nodes", target="hci-x"),
        _alert(alertname="ReplicationMissedCycles", severity="warning", vm="n-3", hci_cluster="hci-nodes", target="hci-x"),
        _alert(alertname="ReplicationNotReplicating", severity="critical", vm="n-4", hci_cluster="hci-nodes", target="hci-x"),
    ]
    active = [
        # Needs action even once the node is back.
        _alert(alertname="ReplicationResyncRequired", severity="critical", vm="n-5", hci_cluster="hci-nodes", target="hci-x"),
        # Another instance's VM.
        _alert(alertname="ReplicationRPOBreach", severity="critical", vm="o-1", hci_cluster="hci-other", target="hci-x"),
    ]
    # The cause first (as it happens): the inhibition is in place before the effects arrive.
    await _post(routed_am, node)
    source = await _until(lambda: routed_am.get_alerts(labels={"node": "hci-nodes-n2"}), "node alert stored")
    fingerprint = source[0]["fingerprint"]
    await _post(routed_am, *inhibited, *active)
    for alert in inhibited:
        vm = alert["labels"]["vm"]
        status = (await _until(_inhibited(routed_am, vm=vm), f"{vm} inhibited"))[0]["status"]
        assert status == {"state": "suppressed", "inhibitedBy": [fingerprint], "silencedBy": []}, (vm, status)
    for alert in active:
        status = (await _status(routed_am, vm=alert["labels"]["vm"]))["status"]
        assert status == {"state": "active", "inhibitedBy": [], "silencedBy": []}, status

    await _until(lambda: len(webhooks.about(hci_cluster="hci-nodes")) + len(webhooks.about(vm="o-1")) >= 3, "pages")
    await asyncio.sleep(GRACE_S)
    notified = {(r, a["labels"]["alertname"], a["labels"].get("vm", a["labels"].get("node"))) for r, a in
                webhooks.about(hci_cluster="hci-nodes") + webhooks.about(vm="o-1")}
    assert notified == {
        ("pager", "NodeHeartbeatLost", "hci-nodes-n2"),
        ("pager", "ReplicationResyncRequired", "n-5"),
        ("pager", "ReplicationRPOBreach", "o-1"),
    }

    # The node reports again: its alert resolves and the VM's breach is no longer held back.
    await _post(routed_am, _alert(ends_in_s=-1, **node["labels"]))
    await _until(lambda: ("pager", "n-1") in {(r, a["labels"].get("vm")) for r, a in webhooks.about(vm="n-1")},
                 "breach paged after the node alert resolved")
    assert (await _status(routed_am, vm="n-1"))["status"]["state"] == "active"


async def test_ingest_stalled_inhibits_heartbeat_loss_of_the_same_rpowatch(
    routed_am: Alertmanager, webhooks: Webhooks
) -> None:
    await _post(
        routed_am,
        # rpowatch's own alerts carry no job/instance: a stall holds back its heartbeat losses.
        _alert(alertname="IngestStalled", severity="critical", source="kafka"),
        # Prometheus-side alerts: only the stalled rpowatch instance's nodes are held back.
        _alert(alertname="IngestStalled", severity="critical", source="mqtt", job="rpowatch", instance="rw-1:9464"),
    )
    def both_stalls() -> list[dict[str, Any]]:
        stalls = routed_am.get_alerts(labels={"alertname": "IngestStalled"})
        return stalls if len(stalls) == 2 else []

    stalls = await _until(both_stalls, "stalls stored")
    await _post(
        routed_am,
        _alert(alertname="NodeHeartbeatLost", severity="critical", hci_cluster="hci-stall", node="hci-stall-n1"),
        _alert(alertname="NodeHeartbeatLost", severity="critical", hci_cluster="hci-stall-p1", node="p1-n1",
               job="rpowatch", instance="rw-1:9464"),
        _alert(alertname="NodeHeartbeatLost", severity="critical", hci_cluster="hci-stall-p2", node="p2-n1",
               job="rpowatch", instance="rw-2:9464"),
    )
    by_source = {a["labels"]["source"]: a["fingerprint"] for a in stalls}
    for node, source in (("hci-stall-n1", "kafka"), ("p1-n1", "mqtt")):
        status = (await _until(_inhibited(routed_am, node=node), f"{node} inhibited"))[0]["status"]
        assert status["state"] == "suppressed"
        assert status["inhibitedBy"] == [by_source[source]], (node, status)
    assert (await _status(routed_am, node="p2-n1"))["status"]["inhibitedBy"] == []

    await _until(lambda: webhooks.about(node="p2-n1"), "the other rpowatch's node paged")
    await asyncio.sleep(GRACE_S)
    assert webhooks.about(node="hci-stall-n1") == []
    assert webhooks.about(node="p1-n1") == []
    assert {r for r, _ in webhooks.about(alertname="IngestStalled")} == {"pager"}


async def test_saturated_link_inhibits_at_risk_on_that_link_only(routed_am: Alertmanager, webhooks: Webhooks) -> None:
    link = _alert(alertname="ReplicationLinkSaturated", severity="warning", hci_cluster="hci-link", target="hci-dr")
    await _post(routed_am, link)
    source = await _until(lambda: routed_am.get_alerts(labels={"alertname": "ReplicationLinkSaturated"}), "link stored")
    await _post(
        routed_am,
        _alert(alertname="ReplicationRPOAtRisk", severity="warning", vm="l-1", hci_cluster="hci-link", target="hci-dr"),
        # Same instance, another target: a different link.
        _alert(alertname="ReplicationRPOAtRisk", severity="warning", vm="l-2", hci_cluster="hci-link",
               target="azure:westeurope"),
        # A breach on the saturated link still pages.
        _alert(alertname="ReplicationRPOBreach", severity="critical", vm="l-3", hci_cluster="hci-link", target="hci-dr"),
    )
    status = (await _until(_inhibited(routed_am, vm="l-1"), "l-1 inhibited"))[0]["status"]
    assert status == {"state": "suppressed", "inhibitedBy": [source[0]["fingerprint"]], "silencedBy": []}
    for vm in ("l-2", "l-3"):
        assert (await _status(routed_am, vm=vm))["status"]["state"] == "active"

    await _until(lambda: webhooks.about(vm="l-2") and webhooks.about(vm="l-3"), "l-2 and l-3 notified")
    await asyncio.sleep(GRACE_S)
    assert webhooks.about(vm="l-1") == []
    assert [r for r, _ in webhooks.about(vm="l-2")] == ["ticket"]
    assert [r for r, _ in webhooks.about(vm="l-3")] == ["pager"]
    assert [r for r, _ in webhooks.about(alertname="ReplicationLinkSaturated")] == ["ticket"]

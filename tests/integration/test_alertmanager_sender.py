"""AlertmanagerSender against a real Alertmanager (tests/harness): a firing alert shows up
active with its labels and annotations, and the resolve makes it inactive.

Alertmanager judges `endsAt` by its own wall clock, so the engine is ticked at real time here.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from exporters.alertmanager import AlertmanagerSender, rfc3339
from exporters.snapshot import SelfCounters
from ingest.contracts import Stream
from ingest.decode import decode_batch
from rules.engine import Engine
from rules.pack import compile_pack
from tests.harness import Alertmanager

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _now_ms() -> int:
    return int(time.time() * 1000)


def _cycle(engine: Engine, vm: str, rp_ms: int) -> None:
    now = _now_ms()
    payload = {
        "event_id": uuid.uuid4().hex,
        "ts": rp_ms + 1_000,
        "vm_id": vm,
        "cluster_id": "c1",
        "target_id": "azure:westeurope",
        "technology": "asr",
        "kind": "cycle_completed",
        "frequency_s": 300,
        "recovery_point_ts": rp_ms,
    }
    decoded = decode_batch(Stream.REPLICATION, [json.dumps(payload).encode()], now)
    assert decoded.rejects.is_empty()
    engine.apply(Stream.REPLICATION, decoded.valid, now)


async def _wait_for(
    alertmanager: Alertmanager, labels: dict[str, str], want: int, timeout_s: float = 10.0
) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        alerts = await asyncio.to_thread(alertmanager.get_alerts, labels=labels)
        if len(alerts) == want or time.monotonic() > deadline:
            return alerts
        await asyncio.sleep(0.2)


async def test_firing_then_resolved_in_real_alertmanager(alertmanager: Alertmanager) -> None:
    with open(REPO / "rules" / "packs" / "default.yaml") as f:
        document = yaml.safe_load(f)
    # The shipped breach rule alone, so the VM raises exactly one alert.
    document["rules"] = [r for r in document["rules"] if r["alert"] == "ReplicationRPOBreach"]
    pack, problems = compile_pack(document, {"runbook_base": "https://runbooks.example/rpowatch"})
    assert problems == []
    engine = Engine(pack)
    vm = f"vm-{uuid.uuid4().hex[:8]}"  # the Alertmanager is shared by the session
    _cycle(engine, vm, _now_ms() - 700_000)  # 700 s behind, RPO 600 s: ReplicationRPOBreach
    counters = SelfCounters()
    identity = {"alertname": "ReplicationRPOBreach", "vm": vm}

    async with aiohttp.ClientSession() as session:
        sender = AlertmanagerSender(
            urls=[alertmanager.url],
            session=session,
            counters=counters,
            evaluation_interval_s=15.0,
            generator_url_base="http://127.0.0.1:9464",
        )
        fired = engine.tick(_now_ms())
        await sender.send(fired)

        alerts = await _wait_for(alertmanager, identity, want=1)
        assert len(alerts) == 1, alerts
        alert = alerts[0]
        assert alert["status"]["state"] == "active"
        assert alert["labels"] == {
            "alertname": "ReplicationRPOBreach",
            "severity": "critical",
            "service": "rpowatch",
            "vm": vm,
            "hci_cluster": "c1",
            "target": "azure:westeurope",
            "technology": "asr",
        }
        assert alert["annotations"]["summary"] == "A VM cannot be recovered within its replication RPO."
        assert vm in alert["annotations"]["description"]
        assert alert["annotations"]["runbook_url"] == "https://runbooks.example/rpowatch/ReplicationRPOBreach.md"
        assert alert["generatorURL"].startswith("http://127.0.0.1:9464/api/v1/alerts?alertname=ReplicationRPOBreach")
        # Alertmanager normalises the time format; compare instants to the second.
        assert alert["startsAt"][:19] == rfc3339(fired.now_ms)[:19]

        _cycle(engine, vm, _now_ms() - 1_000)  # caught up: resolves
        resolved = engine.tick(_now_ms())
        assert resolved.alerts.filter(alertname="ReplicationRPOBreach")["state"].to_list() == ["resolved"]
        await sender.send(resolved)
        assert await _wait_for(alertmanager, identity, want=0) == []

    stats = counters.freeze()
    assert stats.alertmanager_notifications_total == {alertmanager.url: 2}
    assert stats.alertmanager_notifications_failed_total == {alertmanager.url: 0}

"""`rpowatch demo --duration 60`: alerts fire and resolve within the minute, /metrics serves."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.harness.ports import free_port

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ("ReplicationRPOAtRisk", "ReplicationRPOBreach", "NodeHeartbeatLost", "BackupRPOBreach")


def test_demo_fires_and_resolves_every_scripted_incident_and_serves_metrics() -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rpowatch.cli", "demo", "--duration", "60", "--port", str(port), "--vms", "300"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        families: dict[str, list[object]] = {}
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(families.get("rpowatch_replication_lag_seconds", [])) < 300:
            time.sleep(1)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                    text = resp.read().decode()
            except OSError:
                continue
            families = {f.name: f.samples for f in text_string_to_metric_families(text)}
        lag = families.get("rpowatch_replication_lag_seconds", [])
        assert len(lag) == 300, f"expected a lag series per simulated VM, got {len(lag)}"
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, stderr
    lines = stdout.splitlines()
    for alert in ALERTS:
        assert any("FIRED" in line and alert in line for line in lines), (alert, stdout)
        assert any("RESOLVED" in line and alert in line for line in lines), (alert, stdout)
    assert lines[-1].startswith("demo finished after 6")
    # One line per transition whatever its length (a link's two labels once wrapped at 80).
    transitions = lines[1:-1]
    assert transitions and all(line.startswith("t+") for line in transitions), stdout
    assert "Traceback" not in stderr

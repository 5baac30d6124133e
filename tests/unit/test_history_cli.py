"""`rpowatch history lag|compliance|alerts|compact`: table (with a chart), CSV and JSON output."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from rpowatch.cli import app
from rpowatch.history_cli import lag_chart
from exporters.history.store import HistoryStore
from exporters.history.tables import ALERTS, DAY_MS, VM

T0 = 20_400 * DAY_MS  # 2025-11-08
MIN = 60_000
WINDOW = ["--start", "2025-11-08", "--end", "2025-11-09"]


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    store = HistoryStore(tmp_path)
    rows = [
        {"ts_ms": T0 + m * MIN, "interval_ms": MIN, "vm": "vm-1", "hci_cluster": "c1", "target": "t",
         "technology": "asr", "service_group": "sql", "lag_max_seconds": 900.0 if 20 <= m < 25 else 30.0 + m,
         "lag_last_seconds": 30.0, "rpo_target_seconds": 600.0, "pending_bytes": 1024, "samples": 60,
         "last_at_ms": T0 + m * MIN + 59_000}
        for m in range(60)
    ]
    store.write_rows(VM, pl.DataFrame(rows, schema=VM.schema))
    store.write_rows(ALERTS, pl.DataFrame(
        [{"at_ms": T0 + 20 * MIN, "alertname": "ReplicationRPOBreach", "alert_key": "vm-1", "transition": "fired",
          "severity": "critical", "hci_cluster": "c1", "vm": "vm-1", "node": None, "labels": '{"vm": "vm-1"}',
          "annotations": '{"summary": "A VM cannot be recovered within its replication RPO."}'}],
        schema=ALERTS.schema,
    ))
    return tmp_path


def run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["history", *args])
    return result.exit_code, result.stdout, result.stderr


def test_lag_as_json_csv_and_table_with_a_chart(store_dir: Path) -> None:
    code, out, _ = run("lag", "--path", str(store_dir), "--vm", "vm-1", *WINDOW, "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert len(rows) == 60 and rows[20]["lag_max_seconds"] == 900.0 and rows[20]["within_rpo"] is False

    code, out, _ = run("lag", "--path", str(store_dir), "--vm", "vm-1", *WINDOW, "--step", "30m", "-f", "csv")
    assert code == 0
    table = list(csv.DictReader(io.StringIO(out)))
    assert [(r["time"], r["lag_max_seconds"]) for r in table] == [
        ("2025-11-08T00:00:00.000Z", "900.0"), ("2025-11-08T00:30:00.000Z", "89.0")]

    code, out, _ = run("lag", "--path", str(store_dir), "--vm", "vm-1", *WINDOW)
    assert code == 0
    assert "lag of vm-1" in out and "╌" in out and "█" in out  # the chart, with its RPO line
    assert "15m 00s" in out and "1024" in out  # the table, with durations for people


def test_compliance_and_alerts(store_dir: Path) -> None:
    code, out, _ = run("compliance", "--path", str(store_dir), *WINDOW, "--group-by", "service_group", "-f", "json")
    assert code == 0
    (row,) = json.loads(out)
    assert (row["service_group"], row["breaches"], row["longest_breach_seconds"]) == ("sql", 1, 300.0)
    code, out, _ = run("compliance", "--path", str(store_dir), *WINDOW)
    assert code == 0 and "91.667 %" in out and "5m 00s" in out

    code, out, _ = run("alerts", "--path", str(store_dir), *WINDOW, "--vm", "vm-1", "-f", "csv")
    assert code == 0
    (alert,) = csv.DictReader(io.StringIO(out))
    assert alert["alertname"] == "ReplicationRPOBreach" and alert["time"] == "2025-11-08T00:20:00.000Z"
    code, out, _ = run("alerts", "--path", str(store_dir), *WINDOW)
    assert code == 0 and "ReplicationRPOBreach" in out


def test_compact_then_the_same_answers(store_dir: Path) -> None:
    before = run("compliance", "--path", str(store_dir), *WINDOW, "-f", "json")[1]
    code, out, _ = run("compact", "--path", str(store_dir), "--seal-after", "0s")
    assert code == 0 and "sealed 2" in out  # the VM table and the alert log
    assert run("compliance", "--path", str(store_dir), *WINDOW, "-f", "json")[1] == before


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["lag", "--vm", "vm-1", "--start", "tomorrow"], "start='tomorrow' is not a time"),
        (["compliance", "--group-by", "planet"], "group_by='planet' is not supported"),
        (["alerts", "--transition", "paged"], "use fired or resolved"),
    ],
)
def test_bad_options_exit_2_with_a_message(store_dir: Path, args: list[str], says: str) -> None:
    code, _, err = run(*args, "--path", str(store_dir))
    assert code == 2 and says in err


def test_a_store_is_required(tmp_path: Path) -> None:
    code, _, err = run("lag", "--vm", "a")
    assert code == 2 and "give exactly one of --path" in err
    code, _, err = run("lag", "--vm", "a", "--path", str(tmp_path / "missing"))
    assert code == 2 and "is not a directory" in err
    config = tmp_path / "rpowatch.yaml"
    config.write_text("history:\n  resolution: 7s\n")
    code, _, err = run("lag", "--vm", "a", "--config", str(config))
    assert code == 2 and "history.resolution" in err


def test_lag_chart_squeezes_points_into_columns_and_marks_the_rpo() -> None:
    lines = lag_chart([10.0] * 10 + [100.0] * 10, [50.0] * 20, width=4, height=4)
    assert [line for line, _ in lines] == ["  ▆▆", "  ██", "╌╌██", "▃▃██"]  # top = 105 (5 % headroom)
    assert lines[0][1] == [False, False, True, True]
    assert lag_chart([], [], width=10) == []

"""Configuration and `rpowatch check`: defaults, environment overrides, one line per problem."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from rpowatch.loading import ConfigError, check, load_rule_packs, load_settings

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str, name: str = "rpowatch.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_the_shipped_example_is_valid() -> None:
    assert check(ROOT / "examples" / "rpowatch.yaml") == []


def test_defaults_follow_the_platform() -> None:
    settings = load_settings(None)
    assert settings.evaluation.interval == 1.0
    assert settings.alertmanager.resolved_retention == 900.0
    default = settings.effective_policies()[-1]
    assert default.replication_rpo_seconds is None  # → 2 x replication interval
    assert default.backup_rpo_seconds == 86_400
    assert default.failover_test_max_age_seconds == 31 * 86_400
    assert default.restore_test_max_age_seconds == 90 * 86_400
    names = [r.name for r in load_rule_packs(settings).rules]
    assert len(names) == 19 and {"ReplicationRPOBreach", "NodeHeartbeatLost", "IngestStalled"} <= set(names)


def test_environment_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "http:\n  port: 9000\nevaluation:\n  interval: 2s\n")
    monkeypatch.setenv("RPOWATCH_HTTP__PORT", "9100")
    settings = load_settings(path)
    assert settings.http.port == 9100
    assert settings.evaluation.interval == 2.0


def test_every_problem_is_reported_with_file_line_and_field(tmp_path: Path) -> None:
    path = write(tmp_path, "\n".join([
        "http:",
        "  port: 99999",
        "evaluation:",
        "  interval: soon",
        "alertmanager:",
        "  urls: [ftp://x]",
        "policies:",
        "  - name: p",
        "    replication_rpo_seconds: -5",
        "surprise: 1",
        "export:",
        "  max_vms: 0",
    ]) + "\n")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    lines = [str(p) for p in info.value.problems]
    assert len(lines) == 6
    assert any(line.startswith(f"{path}:2: http.port:") for line in lines)
    assert any(line.startswith(f"{path}:4: evaluation.interval:") and "not a duration" in line for line in lines)
    assert any(line.startswith(f"{path}:6: alertmanager.urls") and "http(s)" in line for line in lines)
    assert any(line.startswith(f"{path}:9: policies[0].replication_rpo_seconds:") for line in lines)
    assert any(line.startswith(f"{path}:10: surprise:") for line in lines)
    assert any(line.startswith(f"{path}:12: export.max_vms:") and "greater than 0" in line for line in lines)


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "http:\n  port: 1\n bad: [\n")
    problems = check(path)
    assert len(problems) == 1
    assert problems[0].line == 3 and "not valid YAML" in problems[0].reason


def test_rule_pack_problems_name_file_line_rule_and_field(tmp_path: Path) -> None:
    write(tmp_path, "\n".join([
        "rules:",
        "  - alert: SlowVM",
        "    entity: vm_replication",
        "    condition: lag_secondz > 5",
        "    severity: warning",
        "    annotations: {summary: Slow., description: '{vm}'}",
    ]) + "\n", "pack.yaml")
    path = write(tmp_path, "rule_packs: [pack.yaml]\n")
    problems = check(path)
    assert len(problems) == 1
    text = str(problems[0])
    assert text.startswith(f"{tmp_path / 'pack.yaml'}:4: rule SlowVM: rules[0].condition:")
    assert "lag_secondz" in text


def test_check_command_exits_2_with_one_line_per_problem_and_no_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, "http:\n  port: -1\nevaluation:\n  heartbeat_timeout: 0s\n")
    proc = subprocess.run([sys.executable, "-m", "rpowatch.cli", "check", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith(f"{path}:2: http.port:")
    assert lines[1].startswith(f"{path}:4: evaluation.heartbeat_timeout:")
    assert lines[2] == "2 problem(s) found"
    assert "Traceback" not in proc.stderr

    ok = subprocess.run([sys.executable, "-m", "rpowatch.cli", "check", str(ROOT / "examples" / "rpowatch.yaml")],
                        capture_output=True, text=True, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr


def test_run_with_a_bad_config_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, "sources:\n  kafka:\n    enabled: maybe\n")
    proc = subprocess.run([sys.executable, "-m", "rpowatch.cli", "run", "--config", str(path)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert f"{path}:3: sources.kafka.enabled:" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_per_vm_series_are_capped_by_default_and_the_cap_can_be_lifted(tmp_path: Path) -> None:
    assert load_settings(write(tmp_path, "{}\n")).export.max_vms == 100_000
    assert load_settings(write(tmp_path, "export:\n  max_vms: null\n")).export.max_vms is None
    assert load_settings(write(tmp_path, "export:\n  max_vms: 5000\n")).export.max_vms == 5000

"""The `history` configuration section: defaults, validation with file:line, environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from rpowatch.loading import check, load_settings


def test_defaults() -> None:
    history = load_settings(None).history
    assert (history.enabled, history.resolution, history.retention) == (False, 60.0, 400 * 86_400.0)
    assert (history.compaction.min_files, history.compaction.seal_after) == (60, 600.0)


def test_values_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "rpowatch.yaml"
    path.write_text("history:\n  enabled: true\n  path: az://bucket/history\n  resolution: 5m\n  retention: 90d\n")
    monkeypatch.setenv("RPOWATCH_HISTORY__STORAGE_OPTIONS__ACCOUNT_KEY", "secret")
    history = load_settings(path).history
    assert (history.path, history.resolution, history.retention) == ("az://bucket/history", 300.0, 90 * 86_400.0)
    assert history.plain_storage_options() == {"account_key": "secret"}
    assert "secret" not in repr(history)


@pytest.mark.parametrize(
    ("yaml", "says"),
    [
        ("history:\n  resolution: 7s\n", "history.resolution: Value error, must be at least 1s and divide a day"),
        ("history:\n  resolution: 500ms\n", "history.resolution"),
        ("history:\n  compaction:\n    min_files: 1\n", "history.compaction.min_files"),
        ("history:\n  retension: 30d\n", "history.retension"),
    ],
)
def test_problems_name_the_line(tmp_path: Path, yaml: str, says: str) -> None:
    path = tmp_path / "rpowatch.yaml"
    path.write_text(yaml)
    problems = [str(p) for p in check(path)]
    assert len(problems) == 1 and says in problems[0] and f"{path}:" in problems[0]

"""bench.tick_ab: the A/B comparison of the tick at two versions of rules/ runs and checks
that both versions keep the same alerts."""

from __future__ import annotations

import pytest

from bench import tick_ab


def test_comparing_the_working_tree_with_head_runs_and_finds_the_same_alerts(capsys: pytest.CaptureFixture[str]) -> None:
    tick_ab.main(["--baseline", "HEAD", "--vms", "2000", "--warmup", "1", "--ticks", "2"])
    out = capsys.readouterr().out
    assert "alerts equal at every tick" in out
    assert "| tick median ms |" in out


def test_an_unknown_baseline_is_a_clear_error() -> None:
    with pytest.raises(SystemExit, match="git archive no-such-revision rules"):
        tick_ab.main(["--baseline", "no-such-revision", "--vms", "2000", "--ticks", "1"])

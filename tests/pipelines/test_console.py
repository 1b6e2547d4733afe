"""The stage line a person watches: full when the stage finished, where it stopped when it did not."""
from __future__ import annotations

import pytest

from pipelines import console


def _run_stage(steps: int, total: int, fail: bool) -> None:
    with console.stage("[1/1] training") as st:
        st.follow(None, total, unit="steps")
        for _ in range(steps):
            st.update()
        if fail:
            raise KeyboardInterrupt


def test_finished_stage_fills_its_bar(capsys):
    _run_stage(10, 10, fail=False)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "10/10 steps" in last and "stopped" not in last


def test_interrupted_stage_shows_where_it_stopped(capsys):
    """Ctrl-C (or a hang killed by CI) after 3 of 10 steps must not draw a full bar."""
    with pytest.raises(KeyboardInterrupt):
        _run_stage(3, 10, fail=True)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert "3/10 steps" in last and "stopped" in last and "10/10" not in last

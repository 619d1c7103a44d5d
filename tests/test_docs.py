"""The code in README.md and docs/ runs, so the documentation cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _blocks(relative: str) -> list[str]:
    return _BLOCK.findall((ROOT / relative).read_text(encoding="utf-8"))


def test_readme_example_drives_the_core_to_ready_and_a_heartbeat(
    capsys: pytest.CaptureFixture[str],
) -> None:
    (block,) = _blocks("README.md")
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - our own documentation
    printed = capsys.readouterr().out
    assert "OpenConnection(url='wss://api.sgroup.qq.com/websocket', attempt=1)" in printed
    assert "Ready(session_id='abc', seq=1)" in printed
    assert "ACCESS_TOKEN" not in printed  # the Identify payload is never shown
    conn = namespace["conn"]
    assert type(conn).__name__ == "GatewayConnection"
    assert conn.state.name == "READY"  # type: ignore[attr-defined]
    heartbeat = conn.drain()  # type: ignore[attr-defined]
    assert [type(o).__name__ for o in heartbeat] == ["SendPayload"]
    assert heartbeat[0].text == '{"op":1,"d":1}'


def test_testing_guide_example_passes() -> None:
    (block,) = _blocks("docs/testing.md")
    namespace: dict[str, object] = {}
    exec(compile(block, "docs/testing.md", "exec"), namespace)  # noqa: S102
    test = namespace["test_my_bot_survives_a_zombie_link"]
    assert callable(test)
    test()

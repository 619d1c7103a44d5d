"""Smoke tests: the benchmarks still run and print their tables (numbers are not checked)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "codec.py"


def test_codec_benchmark_quick_run_prints_its_table(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("qqproto_benchmarks_codec", BENCHMARK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    assert module.main(["--quick"]) == 0

    out = capsys.readouterr().out
    assert "GROUP_AT_MESSAGE_CREATE dispatch" in out
    assert " bytes UTF-8" in out
    for label in (
        "json.loads(str)",
        "orjson.loads(str)",
        "qqproto.decode_payload(str)",
        "qqproto.decode_payload(bytes)",
    ):
        assert label in out
    assert "µs" in out
    assert "goal: decode_payload <= 0.6x json.loads" in out
    verdicts = [line for line in out.splitlines() if line.rstrip().endswith("met")]
    assert len(verdicts) == 2


RUN = BENCHMARK.parent / "run.py"

# Every goal the table must list, whatever the machine measured.
GOALS = (
    ("qqproto / botpy (disp/s)", ">= 1.1x"),
    ("qqproto / bare (disp/s)", ">= 1.0x"),
    ("server ceiling / fastest client", ">= 2x"),
    ("core / json.loads", "<= 0.8x"),
    ("1 session, 1 virtual h", ">= 86,400x"),
    ("100 shards", ">= 86,400x"),
    ("RSS over", "< 1 % growth"),
    ("gc objects over", "< 1 % growth"),
    ("open fds over", "equal"),
    ("idle RSS qqproto / botpy", "<= 0.8x"),
    ("(a) last ACK -> ZombieDetected", "<= 2 s"),
    ("(b) ZombieDetected -> Resumed", "<= "),
    ("CPU per 10k dispatches, 100 shards / 1", "<= 1.1x"),
)


def test_run_quick_prints_every_figure_with_its_goal() -> None:
    # A subprocess, as a user runs it (and so that its sockets and loops stay out of ours).
    # PYTHONPATH: the benchmarks' own child processes import the tree under test too.
    env = {**os.environ, "PYTHONPATH": str(RUN.parent.parent)}
    done = subprocess.run(  # noqa: S603
        [sys.executable, str(RUN), "--quick"],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    for figure in ("== 1 receive", "== 2 core alone", "== 3 simulation", "== 4 memory"):
        assert figure in out
    for figure in ("== 5 idle cost", "== 6 zombie", "== 7 delivery record", "== 8 shards"):
        assert figure in out
    lines = out.splitlines()
    for measure, goal in GOALS:
        matching = [line for line in lines if measure in line and goal in line]
        assert matching, f"no row for {measure!r} with goal {goal!r}"
        verdict = matching[0].rstrip()
        assert verdict.endswith(("met", "NOT met", "n/a")), verdict
    for label in ("(a) bare", "(b) qqproto_io.GatewayClient", "(c) botpy", "(d) byte counter"):
        assert label in out
    if importlib.util.find_spec("botpy") is None:
        assert "n/a: qq-botpy not installed" in out
    assert "failed" not in out, out
    assert "goals met:" in out

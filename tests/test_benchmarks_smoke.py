"""Smoke test: the codec benchmark still runs (its numbers are not checked)."""

from __future__ import annotations

import importlib.util
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

"""Benchmark: decode one ~1 KB GROUP_AT_MESSAGE_CREATE dispatch.

Compares, in the same run and interleaved over several rounds, the stdlib ``json.loads``,
plain ``orjson.loads`` and ``qqproto.decode_payload`` (on ``str`` and on ``bytes``), and checks
the goal ``decode_payload <= 0.6x json.loads``. Times are printed, never asserted; the exit
status is 0 whatever the
times (1 only if a decoder returns a wrong result).

    .venv/bin/python benchmarks/codec.py            # 7 rounds x 20,000 calls
    .venv/bin/python benchmarks/codec.py --quick    # a smoke run for CI (numbers are noise)
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from typing import TYPE_CHECKING, Any

import orjson

from qqproto import Opcode, Payload, decode_payload

if TYPE_CHECKING:
    from collections.abc import Callable

GOAL_RATIO = 0.6
"""decode_payload must take at most this fraction of json.loads' time."""

FULL_ROUNDS, FULL_NUMBER = 7, 20_000
QUICK_ROUNDS, QUICK_NUMBER = 3, 200


def build_payload() -> dict[str, Any]:
    """A realistic GROUP_AT_MESSAGE_CREATE dispatch: mixed Chinese/English, one image."""
    member = "E4F4AEA33253A2797FB897C50B81D7ED"
    group = "C9F778FE6ADF9D1D1DBE395BF744A33A"
    return {
        "op": 0,
        "s": 42,
        "t": "GROUP_AT_MESSAGE_CREATE",
        "id": "GROUP_AT_MESSAGE_CREATE:e4c8c3a0-5b0e-4f6c-9a0b-7d6a4f1e2c3bqj8zw2",
        "d": {
            "author": {
                "id": member,
                "member_openid": member,
                "union_openid": "0D5A3C8F1E2B4A6C9D7E8F0A1B2C3D4E",
            },
            "content": (
                " 帮我总结一下今天的会议 notes, 重点是 Q3 roadmap 和 budget 两部分. "
                "另外把截图里的 error message 翻译成中文, thanks!"
            ),
            "group_id": group,
            "group_openid": group,
            "id": "ROBOT1.0_veoihSeuhEEnh0kq1xA2tbgzkd8tGHBY9mTIVwG.4O4FMjbPoOd8wNnxlWdg2bUr",
            "timestamp": "2024-10-23T14:30:12+08:00",
            "attachments": [
                {
                    "content_type": "image/png",
                    "filename": "7A2C3E4B5D6F708192A3B4C5D6E7F809.png",
                    "height": 1080,
                    "width": 1920,
                    "size": 245761,
                    "url": (
                        "https://multimedia.nt.qq.com.cn/download?appid=1407"
                        "&fileid=CgoxMjM0NTY3ODkwEhQ7LkHc0Zx2pQ9aB3kR8sT1uV4wXy5z"
                        "&rkey=CAQSKAB6JWENi5LMtWVWVxS2RfZdDr8dA9mzRk2mXq0&spec=0"
                    ),
                }
            ],
            "message_scene": {"source": "default"},
            "message_type": 0,
        },
    }


def _per_call_us(func: Callable[[Any], object], arg: object, number: int) -> float:
    """Microseconds per call of ``func(arg)`` over ``number`` calls, GC off (as timeit)."""
    loop = range(number)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in loop:
            func(arg)
        elapsed = time.perf_counter() - start
    finally:
        if gc_was_enabled:
            gc.enable()
    return elapsed / number * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a few hundred calls only: a smoke run for CI"
    )
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 7, quick 3)")
    parser.add_argument("--number", type=int, help="calls per decoder per round")
    args = parser.parse_args(argv)
    rounds = args.rounds or (QUICK_ROUNDS if args.quick else FULL_ROUNDS)
    number = args.number or (QUICK_NUMBER if args.quick else FULL_NUMBER)

    payload = build_payload()
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    data = text.encode()

    contenders: list[tuple[str, Callable[[Any], object], str | bytes]] = [
        ("json.loads(str)", json.loads, text),
        ("orjson.loads(str)", orjson.loads, text),
        ("qqproto.decode_payload(str)", decode_payload, text),
        ("qqproto.decode_payload(bytes)", decode_payload, data),
    ]

    # Every decoder must agree before any of them is timed (a wrong result, unlike a slow one,
    # is a failure: exit status 1).
    for label, func, arg in contenders:
        result: Any = func(arg)
        if isinstance(result, Payload):
            ok = result == (Opcode.DISPATCH, payload["d"], 42, payload["t"], payload["id"])
        else:
            ok = result == payload
        if not ok:
            print(f"{label} decoded the payload wrongly", file=sys.stderr)
            return 1

    print(
        f"payload: GROUP_AT_MESSAGE_CREATE dispatch, {len(data)} bytes UTF-8 "
        f"({len(text)} code points), compact, ensure_ascii=False"
    )
    print(
        f"timing: {rounds} interleaved rounds x {number} calls per decoder "
        f"(time.perf_counter, GC off){'  [--quick: numbers are noise]' if args.quick else ''}"
    )

    samples: dict[str, list[float]] = {label: [] for label, _, _ in contenders}
    for round_index in range(rounds):
        # Rotate the order each round so no decoder always runs first (cold) or last.
        shift = round_index % len(contenders)
        for label, func, arg in contenders[shift:] + contenders[:shift]:
            samples[label].append(_per_call_us(func, arg, number))

    best = {label: min(values) for label, values in samples.items()}
    median = {label: statistics.median(values) for label, values in samples.items()}
    base_best, base_median = best["json.loads(str)"], median["json.loads(str)"]

    print()
    header = f"{'decoder':<31}{'best µs':>9}{'median µs':>11}"
    print(f"{header}{'x json (best)':>15}{'x json (median)':>17}")
    for label, _, _ in contenders:
        print(
            f"{label:<31}{best[label]:>9.3f}{median[label]:>11.3f}"
            f"{best[label] / base_best:>14.2f}x{median[label] / base_median:>16.2f}x"
        )

    print()
    print(f"goal: decode_payload <= {GOAL_RATIO}x json.loads (judged on the median ratio)")
    for label in ("qqproto.decode_payload(str)", "qqproto.decode_payload(bytes)"):
        ratio = median[label] / base_median
        verdict = "met" if ratio <= GOAL_RATIO else "NOT met"
        print(f"  {label:<31}{ratio:>6.2f}x  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Instructions per dispatch of the core's receive path, counted by callgrind (repeatable).

Timings on a shared VM drift from run to run; instruction counts do not. This script runs
one operation over the same payloads as figure 2 (``bench_server.dispatch_texts``); run it
twice under callgrind, once with ``--count 0``, and divide the difference by the count:

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.0 \\
        .venv/bin/python benchmarks/callgrind_core.py core --count 0
    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.N \\
        .venv/bin/python benchmarks/callgrind_core.py core --count 4000

``--measure`` does both and prints the figure for each operation named.

Operations: ``core`` (receive()+drain() in READY), ``json`` (json.loads), ``orjson``
(orjson.loads), ``decode`` (qqproto's decode_payload).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

OPS = ("core", "json", "orjson", "decode")
_PAYLOADS = 4000
_WARMUP = 12_000


def run(op: str, count: int) -> None:
    import orjson
    from bench_server import dispatch_texts
    from run import Scripted

    from qqproto._codec import decode_payload

    # Built whatever the count, so that the two runs differ only in the loop.
    texts = dispatch_texts(_WARMUP + _PAYLOADS)
    warmup, texts = texts[:_WARMUP], texts[_WARMUP:][:count]
    scripted = Scripted().start()
    conn, attempt = scripted.conn, scripted.attempt
    receive, drain = conn.receive, conn.drain
    # Past the deduplication memories' count bound (10,000 ids), as most of figure 2 is.
    for text in warmup:
        receive(text, 1.0, attempt=attempt)
        drain()
    gc.disable()  # as figure 2 runs
    if op == "core":
        for text in texts:
            receive(text, 1.0, attempt=attempt)
            drain()
    elif op == "json":
        loads = json.loads
        for text in texts:
            loads(text)
    elif op == "orjson":
        oloads = orjson.loads
        for text in texts:
            oloads(text)
    else:
        for text in texts:
            decode_payload(text)


def _instructions(op: str, count: int, out: Path) -> int:
    subprocess.run(  # noqa: S603
        [  # noqa: S607
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            sys.executable,
            __file__,
            op,
            "--count",
            str(count),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "PYTHONHASHSEED": "0"},  # the same dict probes in both runs
    )
    summary = re.search(r"^summary: (\d+)", out.read_text(), re.MULTILINE)
    assert summary is not None
    return int(summary.group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("op", nargs="+", choices=OPS)
    parser.add_argument("--count", type=int, default=_PAYLOADS)
    parser.add_argument("--measure", action="store_true", help="run callgrind and report")
    args = parser.parse_args()
    if not args.measure:
        for op in args.op:
            run(op, args.count)
        return 0
    # Once outside valgrind, so that neither counted run compiles a changed module.
    subprocess.run([sys.executable, __file__, *args.op, "--count", "1"], check=True)  # noqa: S603
    with tempfile.TemporaryDirectory() as tmp:
        for op in args.op:
            base = _instructions(op, 0, Path(tmp) / f"{op}.0")
            full = _instructions(op, args.count, Path(tmp) / f"{op}.n")
            print(f"{op:8} {(full - base) / args.count:10,.0f} instructions per dispatch")
    return 0


if __name__ == "__main__":
    sys.exit(main())

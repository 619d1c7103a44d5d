# The `qqproto` command line.
#
# `qqproto run` is the project's main job. The network driver (anyio + wsproto) is still
# being built; until it lands, `run` without credentials plays a session against the fake
# gateway inside the deterministic simulator, on a virtual clock, so a newcomer sees the
# whole life of a session - Hello, READY, beats with latencies, dispatches, a server
# rotation (op 7) with its Resume, and a dead link found by the ACK watchdog - in a second.
"""The ``qqproto`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import TYPE_CHECKING

from qqproto import SessionConfig, __version__
from qqproto.testing import FakeGatewayConfig, Simulation
from qqproto_io._describe import describe_event

if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import TextIO

    from qqproto import Event
    from qqproto.testing import SimClient

__all__ = ["main"]

# The life signs a newcomer wants to see, although they are DEBUG-level in a service's log.
_ALWAYS_SHOWN = frozenset({"dispatch", "heartbeat_ack"})

EXIT_OK = 0
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qqproto", description="Keep QQ Bot gateway sessions alive."
    )
    parser.add_argument("--version", action="version", version=f"qqproto {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="run a gateway session (without credentials: a demo against the fake gateway)",
    )
    run.add_argument(
        "--log-format",
        choices=("text", "json"),
        default=os.environ.get("QQBOT_LOG_FORMAT", "text"),
        help="text lines, or one JSON object per event (env QQBOT_LOG_FORMAT)",
    )
    run.add_argument(
        "--verbose", "-v", action="store_true", help="also show state changes and duplicates"
    )
    run.add_argument(
        "--minutes", type=float, default=16.0, help="demo: virtual minutes to simulate"
    )
    run.add_argument("--seed", type=int, default=1, help="demo: the simulation seed")
    return parser


def _emit(out: TextIO, log_format: str, verbose: bool, now: float, event: Event) -> None:
    desc = describe_event(event)
    if desc.level < logging.INFO and not verbose and desc.name not in _ALWAYS_SHOWN:
        return
    if log_format == "json":
        record = {"t": round(now, 3), "event": desc.name, "level": logging.getLevelName(desc.level)}
        record.update(desc.fields)
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
    else:
        out.write(f"[{now:9.3f}s] {logging.getLevelName(desc.level):<7} {desc.message}\n")


def run_demo(minutes: float, seed: int, log_format: str, verbose: bool, out: TextIO) -> int:
    """Play a session against the fake gateway on a virtual clock and print its events."""
    # A short heartbeat and rotation so that the interesting moments fit in a few minutes.
    gateway = FakeGatewayConfig(hello_interval_ms=20_000, rotate_every=300.0)
    sim = Simulation(seed=seed, gateway=gateway)
    client = sim.add_client(SessionConfig())

    def show(_client: SimClient, now: float, event: Event) -> None:
        _emit(out, log_format, verbose, now, event)

    client.on_event = show
    if log_format == "text":
        out.write(
            "qqproto demo: no QQBOT_APP_ID/QQBOT_CLIENT_SECRET given, so this session runs "
            "against the embedded fake gateway on a virtual clock.\n"
            "Script: a message every 15 s, a server rotation (op 7) every 5 min, and at "
            "minute 12 the link turns half-open (bytes vanish, no FIN).\n\n"
        )
    client.start()
    sim.messages_every(15.0, start=10.0)
    sim.at(720.0, lambda: sim.half_open(client))
    sim.run_until(minutes * 60.0)
    ids = [d.event_id for d in client.dispatches]
    once = "each exactly once" if len(ids) == len(set(ids)) else "SOME TWICE"
    if log_format == "text":
        out.write(
            f"\n{minutes:g} virtual minutes: the gateway sent {sim.gateway.dispatched} "
            f"messages; {len(ids)} were delivered, {once} (any missing one was still in "
            "flight when the run ended).\n"
        )
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``qqproto`` console script."""
    args = _parser().parse_args(argv)
    if args.command == "run":
        if os.environ.get("QQBOT_APP_ID") and os.environ.get("QQBOT_CLIENT_SECRET"):
            sys.stderr.write(
                "qqproto run: connecting to the real QQ gateway needs the network driver, "
                "which is not built yet (issue 6). Unset QQBOT_APP_ID to see the demo.\n"
            )
            return EXIT_USAGE
        try:
            return run_demo(args.minutes, args.seed, args.log_format, args.verbose, sys.stdout)
        except BrokenPipeError:
            # `qqproto run | head`: the reader left. Silence the flush at exit, too.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return EXIT_OK
    return EXIT_USAGE  # pragma: no cover - argparse rejects unknown commands


if __name__ == "__main__":
    sys.exit(main())

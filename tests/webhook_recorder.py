"""A bot for the two-process webhook test: each dispatch it handles is one line on stdout.

`qqproto run --webhook ... --app tests.webhook_recorder:setup`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qqproto import Dispatch
    from qqproto_io import GatewayClient


def setup(client: GatewayClient) -> None:
    """Print ``handled <event id>`` for every dispatch, once it reaches the handler."""

    @client.on("*")
    async def record(dispatch: Dispatch) -> None:
        print(f"handled {dispatch.event_id}", flush=True)  # noqa: T201 - what the test reads

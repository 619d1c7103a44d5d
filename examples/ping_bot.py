"""A ping bot: answers "ping" with "pong" in C2C chats, groups and guild channels.

qqproto run --fake --app ping_bot:setup      # against the fake gateway, from examples/
qqproto run --app ping_bot:setup             # with QQBOT_APP_ID and QQBOT_CLIENT_SECRET
"""

from __future__ import annotations

from qqproto import Message
from qqproto_io import GatewayClient  # noqa: TC001 - the one thing a reader needs to see


def setup(client: GatewayClient) -> None:
    """Register the bot's handler; `qqproto run --app` calls this before the sessions start."""

    @client.on(Message)
    async def ping(message: Message) -> None:
        if message.text.lower() == "ping":
            await message.reply("pong")

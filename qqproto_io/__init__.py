"""qqproto_io: the anyio driver for the qqproto core (work in progress)."""

from __future__ import annotations

# The `qqproto` console script. pyproject.toml declares it in the base package (a script cannot
# belong to an extra), but the command line runs on the driver, whose dependencies come with
# the `io` extra. Without them, `qqproto ANYTHING` is one line naming what to install and exit
# code 2 (a bad environment, docs/cli.md), not an ImportError traceback. The check looks for
# every module of the extra before importing any of them, so a partial install is caught too
# (and the line then names the modules missing).
"""The ``qqproto`` console script: the command line, or how to install it."""

from __future__ import annotations

import importlib.util
import sys

__all__ = ["DRIVER_MODULES", "INSTALL_HINT", "main", "missing_driver_modules"]

DRIVER_MODULES = (
    "anyio",
    "wsproto",
    "h11",
    "httpx",
    "prometheus_client",
    "redis",
    "python_socks",
    "socksio",
    "cryptography",
)
"""The import names of the ``io`` extra's requirements, in pyproject.toml's order."""

INSTALL_HINT = "pip install 'qqproto[io]'"


def missing_driver_modules() -> list[str]:
    """The modules of :data:`DRIVER_MODULES` that this interpreter cannot import."""
    return [name for name in DRIVER_MODULES if importlib.util.find_spec(name) is None]


def main() -> int:
    """Run ``qqproto_io._cli.main``, or say in one line that the ``io`` extra is missing."""
    missing = missing_driver_modules()
    if missing:
        which = "" if len(missing) == len(DRIVER_MODULES) else f" (missing: {', '.join(missing)})"
        sys.stderr.write(f"qqproto: the command line needs the io extra{which}: {INSTALL_HINT}\n")
        return 2
    from qqproto_io._cli import main as cli_main  # noqa: PLC0415 - only once the deps are there

    return cli_main()

#!/usr/bin/env python3
"""The project's two commands: ``python3 dev.py run`` and ``python3 dev.py test``.

Each does its own set-up: it creates ``.venv`` beside this file with the standard library's
``venv`` and installs the project, then runs: ``run`` with only what running needs (the
``io`` extra), ``test`` and ``diagram`` with the development toolchain (the ``dev`` extra,
which includes ``io``). The install is redone only when ``pyproject.toml`` changes or a
larger extra is needed (a stamp in the venv), so the second call is fast. Only Python >=
3.11 and network access to the package index are needed.

    python3 dev.py run [ARGS...]   # the main job: ``qqproto run ARGS`` (see README.md)
    python3 dev.py test            # ruff check, ruff format --check, mypy --strict, pytest
    python3 dev.py diagram         # regenerate state_diagram.md from the running machine
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
STAMP = VENV / ".qqproto-install-stamp"

TEST_STEPS: list[tuple[str, list[str]]] = [
    ("ruff check", ["-m", "ruff", "check", "."]),
    ("ruff format --check", ["-m", "ruff", "format", "--check", "."]),
    ("mypy --strict", ["-m", "mypy", "--strict", "qqproto", "qqproto_io", "examples"]),
    # pytest also builds the documentation site strictly (tests/test_docs_site.py).
    ("pytest", ["-m", "pytest", "-q"]),
]


# Each extra with the extras it includes: a venv with "dev" needs nothing more for "io".
EXTRAS = {"io": {"io"}, "dev": {"io", "dev"}}


def _want_stamp(extra: str) -> str:
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    return f"{digest} {extra}"


def ensure_env(extra: str) -> None:
    """Create the venv and install the project with ``extra`` unless the stamp says it is
    there already (the same ``pyproject.toml``, and that extra or one including it)."""
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py may be started by any python3
        sys.exit(f"qqproto needs Python >= 3.11; this is {sys.version.split()[0]}")
    if not PY.exists():
        print(f"dev.py: creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True, clear=True).create(VENV)
    if STAMP.exists():
        digest, _, installed = STAMP.read_text().partition(" ")
        current = _want_stamp(extra).partition(" ")[0]
        if digest == current and extra in EXTRAS.get(installed, set()):
            return
    print(f"dev.py: installing qqproto[{extra}] into .venv", flush=True)
    pip = [str(PY), "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "install", "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "install", "-e", f"{ROOT}[{extra}]"], check=True, cwd=ROOT)
    STAMP.write_text(_want_stamp(extra))


def ensure_redis_server() -> None:
    """Install ``redis-server`` for the Redis tests if missing (apt, as root); never fatal.

    Without it those tests skip with a message, so every failure here is only printed.
    """
    if shutil.which("redis-server") is not None:
        return
    apt = shutil.which("apt-get")
    if apt is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        print("dev.py: redis-server not found (not root with apt-get); Redis tests will skip")
        return
    print("dev.py: installing redis-server with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["update", "-qq"], ["install", "-y", "-qq", "redis-server"]):
        try:
            done = subprocess.run(
                [apt, *args], env=env, capture_output=True, text=True, timeout=600, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            print(f"dev.py: apt-get {args[0]} failed ({exc}); Redis tests will skip")
            return
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            print(f"dev.py: apt-get {args[0]} exited {done.returncode}; Redis tests will skip")
            print("\n".join(tail))
            return


def ensure_diagram_renderer() -> None:
    """Install what renders the state diagram (test and docs site) if missing; never fatal.

    Mermaid comes from the npm registry into ``tools/diagram/node_modules`` (``npm ci``, at
    the versions of its lock file; redone when the lock file changes), Chromium from apt (as
    root). Every failure here is only printed: the render test then fails when run as root,
    skips otherwise, and ``mkdocs build`` stops with a message.
    """
    tools = ROOT / "tools" / "diagram"
    stamp = tools / "node_modules" / ".qqproto-install-stamp"
    want = hashlib.sha256((tools / "package-lock.json").read_bytes()).hexdigest()
    root_apt = shutil.which("apt-get") if hasattr(os, "geteuid") and os.geteuid() == 0 else None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    missing = [
        package
        for package, tool in (("chromium", "chromium"), ("npm", "npm"))
        if shutil.which(tool) is None
    ]
    if missing and root_apt is None:
        print(f"dev.py: {' and '.join(missing)} not found (not root with apt-get)")
    elif missing:
        print(f"dev.py: installing {' '.join(missing)} with apt-get", flush=True)
        for args in (["update", "-qq"], ["install", "-y", "-qq", *missing]):
            try:
                done = subprocess.run(
                    [root_apt, *args],
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=900,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                print(f"dev.py: apt-get {args[0]} failed ({exc})")
                break
            if done.returncode != 0:
                print(f"dev.py: apt-get {args[0]} exited {done.returncode}")
                print("\n".join((done.stderr or done.stdout).strip().splitlines()[-5:]))
                break
    npm = shutil.which("npm")
    if stamp.exists() and stamp.read_text() == want:
        return
    if npm is None:
        print("dev.py: npm not found; the diagram render test and the docs build need Mermaid")
        return
    print("dev.py: installing Mermaid into tools/diagram with npm ci", flush=True)
    args = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
    try:
        done = subprocess.run(
            args, cwd=tools, capture_output=True, text=True, timeout=900, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"dev.py: npm ci failed ({exc})")
        return
    if done.returncode != 0:
        print(f"dev.py: npm ci exited {done.returncode}")
        print("\n".join((done.stderr or done.stdout).strip().splitlines()[-5:]))
        return
    stamp.write_text(want)


def run_tests() -> int:
    """Run every step, even after a failure, and fail if any step failed."""
    ensure_redis_server()
    ensure_diagram_renderer()
    failed: list[str] = []
    for name, args in TEST_STEPS:
        print(f"\n=== {name}", flush=True)
        if subprocess.run([str(PY), *args], cwd=ROOT, check=False).returncode != 0:
            failed.append(name)
    print()
    if failed:
        print(f"dev.py test: FAILED: {', '.join(failed)}")
        return 1
    print("dev.py test: all steps passed")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"run", "test", "diagram"}:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    ensure_env("io" if command == "run" else "dev")
    if command == "test":
        return run_tests()
    if command == "diagram":
        args = [str(PY), "-m", "qqproto._diagram", "--write"]
        return subprocess.run(args, cwd=ROOT, check=False).returncode
    return subprocess.run([str(BIN / "qqproto"), "run", *rest], cwd=ROOT, check=False).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

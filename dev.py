#!/usr/bin/env python3
"""The project's two commands: ``python3 dev.py run`` and ``python3 dev.py test``.

Each does its own set-up: it creates ``.venv`` beside this file with the standard library's
``venv`` and installs the project, then runs: ``run`` with only what running needs (the
``io`` extra), ``test`` and ``diagram`` with the development toolchain (the ``dev`` extra,
which includes ``io``). The install is redone only when ``pyproject.toml`` changes or a
larger extra is needed (a stamp in the venv), so the second call is fast. Only Python >=
3.11 and network access to the package index are needed.

    python3 dev.py run [ARGS...]   # the main job: ``qqproto run ARGS`` (see README.md)
    python3 dev.py test            # ruff check, ruff format --check, mypy --strict, pytest,
                                   # then the sdist and wheel built, checked and installed into
                                   # new venvs: `qqproto demo` here, the core and driver
                                   # tests on the other Pythons claimed (3.12, 3.13)
    python3 dev.py diagram         # regenerate state_diagram.md from the running machine
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import venv
import zipfile
from concurrent.futures import ThreadPoolExecutor, as_completed
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
# After these steps run_tests() builds the sdist and the wheel and installs the wheel into new
# venvs outside the tree: check_package() (on .venv's Python: contents, `qqproto --version`,
# `qqproto demo`) and check_other_pythons() (QUICK_TESTS on every other Python claimed).


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


def _root_apt() -> str | None:
    """``apt-get`` when it is there and we are root, else ``None``."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return None
    return shutil.which("apt-get")


def _run_quietly(args: list[str], what: str, *, timeout: float, **kwargs: object) -> bool:
    """Run ``args``; on failure print one line naming ``what`` and its output's tail."""
    try:
        done = subprocess.run(
            args, capture_output=True, text=True, timeout=timeout, check=False, **kwargs
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"dev.py: {what} failed ({exc})")
        return False
    if done.returncode != 0:
        print(f"dev.py: {what} exited {done.returncode}")
        print("\n".join((done.stderr or done.stdout).strip().splitlines()[-5:]))
        return False
    return True


def _apt_install(packages: list[str]) -> bool:
    """``apt-get update`` then ``install`` ``packages`` (as root); False, printed, on failure."""
    apt = _root_apt()
    if apt is None:
        print(f"dev.py: {' and '.join(packages)} not found (not root with apt-get)")
        return False
    print(f"dev.py: installing {' '.join(packages)} with apt-get", flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    steps = (["update", "-qq"], ["install", "-y", "-qq", *packages])
    return all(_run_quietly([apt, *a], f"apt-get {a[0]}", timeout=900, env=env) for a in steps)


def ensure_redis_server() -> None:
    """Install ``redis-server`` for the Redis tests if missing (apt, as root); never fatal.

    Without it those tests skip with a message, so every failure here is only printed.
    """
    if shutil.which("redis-server") is None and not _apt_install(["redis-server"]):
        print("dev.py: the Redis tests will skip")


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
    missing = [
        package
        for package, tool in (("chromium", "chromium"), ("npm", "npm"))
        if shutil.which(tool) is None
    ]
    if missing:
        _apt_install(missing)
    npm = shutil.which("npm")
    if stamp.exists() and stamp.read_text() == want:
        return
    if npm is None:
        print("dev.py: npm not found; the diagram render test and the docs build need Mermaid")
        return
    print("dev.py: installing Mermaid into tools/diagram with npm ci", flush=True)
    args = [npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
    if not _run_quietly(args, "npm ci", timeout=900, cwd=tools):
        return
    stamp.write_text(want)


# --------------------------------------------------------------- packaging and other Pythons

PYTHONS = ("3.11", "3.12", "3.13")
"""Every Python version pyproject.toml claims (tests/test_packaging.py keeps them equal).

``.venv``'s runs every step; each of the others runs :data:`QUICK_TESTS` on the wheel."""

QUICK_TESTS = [
    "tests/test_core_inputs.py",
    "tests/test_codec.py",
    "tests/test_policy.py",
    "tests/test_client_lifecycle.py",
    "tests/test_hostile_transport.py",
]
"""The core and the driver (asyncio and trio): what differs between Python versions."""

QUICK_TEST_TOOLS = ("pytest", "hypothesis", "trio")
"""What :data:`QUICK_TESTS` need besides ``qqproto[io]``, at the dev extra's version bounds."""

# The source copy the sdist is built from: the tree as it is (stale build/ and egg-info
# included, as a developer's checkout has them), minus what is large and never a candidate.
_COPY_IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "node_modules", ".mypy_cache", ".ruff_cache", ".pytest_cache", ".hypothesis"
)
_PACKAGES = ("qqproto", "qqproto_io")
# What the sdist may hold besides the packages' files (and the license files, if any).
_SDIST_EXTRA = {"PKG-INFO", "README.md", "pyproject.toml", "setup.cfg", "MANIFEST.in"}
_WHEEL_DIST_INFO = {"METADATA", "WHEEL", "entry_points.txt", "top_level.txt", "RECORD"}


class CheckFailed(Exception):
    """One failed expectation of the packaging checks; the message says what and where."""


def _clean_env() -> dict[str, str]:
    """The environment for installed commands: nothing pointing at this checkout or a venv,
    and no QQBOT_* setting of the developer's that could change what a command does."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH"}
    return {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("QQBOT_")}


def _call(args: list[str | Path], cwd: Path, timeout: float = 600) -> str:
    """Run ``args``; return stdout, or raise CheckFailed with the command and its output."""
    try:
        done = subprocess.run(
            [str(a) for a in args],
            cwd=cwd,
            env=_clean_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CheckFailed(f"{' '.join(map(str, args))}: {exc}") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:])
        raise CheckFailed(f"{' '.join(map(str, args))} exited {done.returncode}:\n{tail}")
    return done.stdout


def _new_venv(python: str | Path, where: Path) -> Path:
    """A new venv made by ``python`` (the standard library's venv, with pip); its python."""
    _call([python, "-m", "venv", where], cwd=where.parent, timeout=120)
    return where / ("Scripts" if os.name == "nt" else "bin") / "python"


def _pip_install(python: Path, *requirements: str | Path) -> None:
    """``pip install`` from the package index (pip's own cache of downloads is used)."""
    pip = [python, "-m", "pip", "--disable-pip-version-check", "-q", "install"]
    _call([*pip, *requirements], cwd=python.parent)


def _expected_package_files(source: Path) -> set[str]:
    """Every file of the packages in the source copy: all must be in the sdist and wheel."""
    found = set()
    for package in _PACKAGES:
        for path in (source / package).rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
                found.add(path.relative_to(source).as_posix())
    return found


def _license_files(source: Path) -> set[str]:
    return {
        p.name
        for p in source.iterdir()
        if p.is_file() and re.match(r"(LICEN[CS]E|COPYING)", p.name)
    }


def _check_sdist(sdist: Path, source: Path) -> list[str]:
    """Check that the sdist holds every file of the packages, README.md and the license
    files, and nothing but those and the metadata; return its files."""
    with tarfile.open(sdist) as archive:
        members = [m.name for m in archive.getmembers() if m.isfile()]
    top = sdist.name.removesuffix(".tar.gz") + "/"
    names = {m.removeprefix(top) for m in members}
    if any(not m.startswith(top) for m in members):
        raise CheckFailed(f"{sdist.name}: members outside {top}")
    must = _expected_package_files(source) | {"PKG-INFO", "README.md", "pyproject.toml"}
    must |= _license_files(source)
    if missing := sorted(must - names):
        raise CheckFailed(f"{sdist.name} lacks {', '.join(missing)}")
    allowed = must | _SDIST_EXTRA
    extra = sorted(n for n in names if n not in allowed and not n.startswith("qqproto.egg-info/"))
    if extra:
        raise CheckFailed(f"{sdist.name} holds what it must not: {', '.join(extra)}")
    return sorted(names)


def _check_wheel(wheel: Path, source: Path) -> tuple[list[str], str]:
    """Check the wheel's files, console scripts and metadata; return its files and version."""
    import tomllib  # noqa: PLC0415 - dev.py must start on any python3 to say what it needs

    project = tomllib.loads((source / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    version = wheel.name.split("-")[1]
    dist_info = f"qqproto-{version}.dist-info/"
    must = _expected_package_files(source) | {dist_info + n for n in _WHEEL_DIST_INFO}
    must |= {f"{dist_info}licenses/{n}" for n in _license_files(source)}
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        if missing := sorted(must - names):
            raise CheckFailed(f"{wheel.name} lacks {', '.join(missing)}")
        entry_points = archive.read(dist_info + "entry_points.txt").decode()
        metadata = archive.read(dist_info + "METADATA").decode()
    if extra := sorted(names - must):
        raise CheckFailed(f"{wheel.name} holds what it must not: {', '.join(extra)}")
    for name, target in project["scripts"].items():
        if f"{name} = {target}" not in entry_points.partition("[console_scripts]")[2]:
            raise CheckFailed(f"{wheel.name}: no console script {name} = {target}")
    headers = metadata.split("\n\n", 1)[0].splitlines()
    wanted = [f"Requires-Python: {project['requires-python']}"]
    wanted += [f"Provides-Extra: {extra}" for extra in project["optional-dependencies"]]
    wanted += [f"Classifier: {c}" for c in project["classifiers"]]
    if missing := [w for w in wanted if w not in headers]:
        raise CheckFailed(f"{wheel.name} METADATA lacks {'; '.join(missing)}")
    return sorted(names), version


def _build(work: Path) -> tuple[Path, str]:
    """Build the sdist from a copy of the tree and the wheel from the sdist; check both."""
    source, dist = work / "source", work / "dist"
    shutil.copytree(ROOT, source, ignore=_COPY_IGNORE, symlinks=True)
    _call([PY, "-m", "build", "--outdir", dist, source], cwd=work)
    sdists, wheels = list(dist.glob("*.tar.gz")), list(dist.glob("*.whl"))
    if len(sdists) != 1 or len(wheels) != 1:
        raise CheckFailed(f"python -m build made {[p.name for p in dist.iterdir()]}")
    (sdist,), (wheel,) = sdists, wheels
    _call([PY, "-m", "twine", "check", "--strict", sdist, wheel], cwd=work)
    sdist_names = _check_sdist(sdist, source)
    wheel_names, version = _check_wheel(wheel, source)
    print(
        f"built {sdist.name} ({len(sdist_names)} files) and {wheel.name} "
        f"({len(wheel_names)} files): twine check --strict passed, contents as expected"
    )
    return wheel, version


def _install_and_run(wheel: Path, version: str, work: Path) -> None:
    """Install ``wheel`` into a clean venv outside the tree, from the package index, and run
    its console script: without the io extra, then with it."""
    home = work / "home"  # outside the tree: nothing run here can import from the checkout
    home.mkdir()
    python = _new_venv(PY, home / "venv")
    qqproto = python.parent / "qqproto"
    _pip_install(python, wheel)
    bare = subprocess.run(
        [qqproto, "--version"],
        cwd=home,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = bare.stderr.splitlines()
    if bare.returncode != 2 or bare.stdout or len(lines) != 1 or "qqproto[io]" not in lines[0]:
        raise CheckFailed(
            "without the io extra, `qqproto --version` must be one line on stderr naming "
            f"pip install 'qqproto[io]' and exit 2; got {bare.returncode}, "
            f"stdout {bare.stdout!r}, stderr {bare.stderr!r}"
        )
    print(f"pip install {wheel.name}; qqproto --version: exit 2, {lines[0]!r}")
    _pip_install(python, f"{wheel}[io]")
    show = "import qqproto, qqproto_io; print(qqproto.__file__, qqproto_io.__file__)"
    where = _call([python, "-c", show], cwd=home).split()
    if not all(Path(w).is_relative_to(home / "venv") for w in where):
        raise CheckFailed(f"the clean venv imports qqproto from {where}, not from itself")
    shown = _call([qqproto, "--version"], cwd=home, timeout=60).strip()
    if shown != f"qqproto {version}":
        raise CheckFailed(f"qqproto --version says {shown!r}; the wheel is {version}")
    _call([qqproto, "demo", "--seconds", "2"], cwd=home, timeout=60)
    print(f"pip install '{wheel.name}[io]'; qqproto --version: {shown!r}; qqproto demo: exit 0")


def check_package(work: Path) -> Path | None:
    """Build the sdist (from a copy of the tree) and the wheel (from the sdist), check them
    (twine check --strict, their file lists, the console script, the metadata), then install
    the wheel into a clean venv outside the tree from the package index and run it: without
    the ``io`` extra ``qqproto`` must say in one line what to install; with it ``qqproto
    --version`` and ``qqproto demo --seconds 2`` must succeed. Return the wheel, or None."""
    started = time.monotonic()
    try:
        wheel, version = _build(work)
        print(f"  ({time.monotonic() - started:.1f} s)", flush=True)
        _install_and_run(wheel, version, work)
    except CheckFailed as exc:
        print(f"dev.py: packaging check failed: {exc}")
        return None
    print(f"  ({time.monotonic() - started:.1f} s in all)", flush=True)
    return wheel


def scratch_dir() -> str | None:
    """Where the packaging checks put their venvs: /dev/shm if it is writable, allows exec
    and has room (removing ~120 MB of venvs takes ~10 s on this ext4 disk, 0.2 s there),
    else None (the system's temporary directory). Either is outside the tree."""
    shm = Path("/dev/shm")  # noqa: S108 - only the parent of a mkdtemp (mode 0700) directory
    try:
        stat = os.statvfs(shm)
    except OSError:
        return None
    barred = getattr(os, "ST_NOEXEC", 0) | getattr(os, "ST_RDONLY", 0)
    if stat.f_flag & barred or stat.f_bavail * stat.f_frsize < 2**30 or not os.access(shm, os.W_OK):
        return None
    return str(shm)


def find_python(version: str) -> str | None:
    """An interpreter of ``version`` ("3.12"): pyenv's newest, else pythonX.Y on PATH."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"

    def patch(path: Path) -> int:
        tail = path.parent.parent.name.removeprefix(f"{version}.")
        return int(tail) if tail.isdigit() else -1

    candidates = [
        str(p)
        for p in sorted(pyenv.glob(f"{version}.*/bin/python{version}"), key=patch, reverse=True)
    ]
    if (on_path := shutil.which(f"python{version}")) is not None:
        candidates.append(on_path)
    probe = "import sys, venv, ensurepip; print('%d.%d' % sys.version_info[:2])"
    for candidate in candidates:
        try:
            done = subprocess.run(
                [candidate, "-c", probe], capture_output=True, text=True, timeout=30, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0 and done.stdout.strip() == version:
            return candidate
    return None


def _quick_run(version: str, python: str, wheel: Path, work: Path) -> tuple[bool, str]:
    """Install the wheel with io and the test tools into a new venv of ``python``, and run
    QUICK_TESTS from a copy of tests/ outside the tree (so they import the installed wheel),
    the copy the wheel was built from. Return whether they passed and the report to print."""
    import tomllib  # noqa: PLC0415 - dev.py must start on any python3 to say what it needs

    started = time.monotonic()
    source = work / "source"  # _build's copy: the tests of the very code in the wheel
    project = tomllib.loads((source / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    dev_extra = project["optional-dependencies"]["dev"]
    tools = [r for r in dev_extra if re.split(r"[^\w.-]", r, maxsplit=1)[0] in QUICK_TEST_TOOLS]
    home = work / f"python{version}"
    home.mkdir()
    try:
        venv_python = _new_venv(python, home / "venv")
        # --no-compile: the tests compile what they import; the rest would be CPU for nothing.
        _pip_install(venv_python, "--no-compile", f"{wheel}[io]", *tools)
        installed = time.monotonic() - started
        ignore = shutil.ignore_patterns("__pycache__")
        shutil.copytree(source / "tests", home / "tests", ignore=ignore)
        shutil.copy2(source / "pyproject.toml", home / "pyproject.toml")  # pytest's settings
        args = [venv_python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *QUICK_TESTS]
        out = _call(args, cwd=home, timeout=900)
    except CheckFailed as exc:
        took = time.monotonic() - started
        return False, f"Python {version} ({python}): FAILED after {took:.0f} s: {exc}"
    summary = out.strip().splitlines()[-1]
    took = time.monotonic() - started
    return True, (
        f"Python {version} ({python}): {summary} "
        f"({took:.0f} s, of which {installed:.0f} s the venv and the install)"
    )


def check_other_pythons(wheel: Path | None, work: Path) -> bool:
    """Run QUICK_TESTS on each version of PYTHONS but .venv's, on the wheel installed in a
    new venv each, side by side (mostly waits: installs and the driver's timeouts). A version
    not on this machine is skipped with a message, not failed."""
    started = time.monotonic()
    current = subprocess.run(
        [str(PY), "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(f"Python {current}: every step above ran on it (.venv)")
    others = [v for v in PYTHONS if v != current]
    if wheel is None:
        print(f"Python {', '.join(others)}: not tested: the packaging check made no wheel")
        return False
    jobs = []
    for version in others:
        python = find_python(version)
        if python is None:
            print(f"Python {version}: SKIPPED: no python{version} in pyenv or on PATH")
        else:
            jobs.append((version, python))
    results = []
    if jobs:
        with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
            futures = [pool.submit(_quick_run, *job, wheel, work) for job in jobs]
            for future in as_completed(futures):
                ok, report = future.result()
                print(report, flush=True)
                results.append(ok)
    print(f"  ({time.monotonic() - started:.1f} s)", flush=True)
    return all(results)


def run_tests() -> int:
    """Run every step, even after a failure, and fail if any step failed."""
    ensure_redis_server()
    ensure_diagram_renderer()
    failed: list[str] = []
    for name, args in TEST_STEPS:
        print(f"\n=== {name}", flush=True)
        if subprocess.run([str(PY), *args], cwd=ROOT, check=False).returncode != 0:
            failed.append(name)
    with tempfile.TemporaryDirectory(prefix="qqproto-package-", dir=scratch_dir()) as work:
        print("\n=== package: build, twine check, contents, install and run from a clean venv")
        wheel = check_package(Path(work))
        if wheel is None:
            failed.append("package")
        print(f"\n=== other Pythons: {', '.join(QUICK_TESTS)} on the installed wheel")
        if not check_other_pythons(wheel, Path(work)):
            failed.append("other Pythons")
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

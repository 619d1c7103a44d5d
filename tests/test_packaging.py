"""What ``pip install`` gives: the claims of pyproject.toml, the console script without the
``io`` extra, and dev.py's checks of the sdist and the wheel.

Building them, checking them and running the installed wheel from a clean venv on every
Python claimed is dev.py's work (``python3 dev.py test``: the "package" and "other Pythons"
steps); these are the fast checks of what those steps rely on.
"""

from __future__ import annotations

import io
import re
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest

import dev
import qqproto
from qqproto_io import _entry

ROOT = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _import_name(requirement: str) -> str:
    """``prometheus-client>=0.20`` -> ``prometheus_client`` (true of every io requirement)."""
    return re.split(r"[^\w.-]", requirement, maxsplit=1)[0].lower().replace("-", "_")


# ------------------------------------------------------------------------ the claims


def test_the_driver_modules_are_the_io_extra() -> None:
    io_extra = PROJECT["optional-dependencies"]["io"]
    assert tuple(_import_name(r) for r in io_extra) == _entry.DRIVER_MODULES


def test_the_pythons_tested_are_the_pythons_claimed() -> None:
    claimed = [
        c.rpartition(" :: ")[2]
        for c in PROJECT["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    ]
    assert tuple(claimed) == dev.PYTHONS
    assert PROJECT["requires-python"] == f">={dev.PYTHONS[0]}"


def test_the_version_is_qqproto_version() -> None:
    assert PROJECT["dynamic"] == ["version"]
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]
    assert tool["setuptools"]["dynamic"]["version"] == {"attr": "qqproto.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?(\.post\d+)?(\.dev\d+)?", qqproto.__version__)


def test_every_extra_is_documented() -> None:
    page = (ROOT / "docs" / "install.md").read_text(encoding="utf-8")
    for extra in PROJECT["optional-dependencies"]:
        assert f"`qqproto[{extra}]`" in page, extra
    for requirement in PROJECT["optional-dependencies"]["io"]:
        name = re.split(r"[^\w.-]", requirement, maxsplit=1)[0]
        assert f"`{name}`" in page, requirement


# ------------------------------------------------------------------- the console script


def test_the_console_script_goes_through_the_install_check() -> None:
    assert PROJECT["scripts"] == {"qqproto": "qqproto_io._entry:main"}


def test_without_the_driver_the_command_is_one_line_naming_the_extra(monkeypatch, capsys):
    for name in _entry.DRIVER_MODULES:
        monkeypatch.setitem(sys.modules, name, None)  # what an absent module looks like
    monkeypatch.setattr(sys, "argv", ["qqproto", "--version"])
    assert _entry.main() == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "qqproto: the command line needs the io extra: pip install 'qqproto[io]'\n"


def test_a_partial_install_names_the_modules_missing(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "socksio", None)
    monkeypatch.setitem(sys.modules, "redis", None)
    monkeypatch.setattr(sys, "argv", ["qqproto", "demo"])
    assert _entry.main() == 2
    assert capsys.readouterr().err == (
        "qqproto: the command line needs the io extra (missing: redis, socksio): "
        "pip install 'qqproto[io]'\n"
    )


def test_with_the_driver_the_command_is_the_cli(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["qqproto", "--version"])
    with pytest.raises(SystemExit) as info:
        _entry.main()
    assert info.value.code == 0
    assert capsys.readouterr().out == f"qqproto {qqproto.__version__}\n"


# ----------------------------------------------------- dev.py's sdist and wheel checks

_PACKAGE_FILES = [
    "qqproto/__init__.py",
    "qqproto/py.typed",
    "qqproto/testing/__init__.py",
    "qqproto_io/__init__.py",
    "qqproto_io/py.typed",
]
_SDIST = [
    "PKG-INFO",
    "README.md",
    "pyproject.toml",
    "MANIFEST.in",
    "qqproto.egg-info/SOURCES.txt",
    *_PACKAGE_FILES,
]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A source tree with the two packages (and a subpackage), as dev.py copies it."""
    tree = tmp_path / "source"
    for name in _PACKAGE_FILES:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("")
    (tree / "qqproto" / "__pycache__").mkdir()
    (tree / "qqproto" / "__pycache__" / "__init__.cpython-311.pyc").write_bytes(b"")
    (tree / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    return tree


def _sdist(where: Path, names: list[str]) -> Path:
    path = where / "qqproto-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name in names:
            archive.addfile(tarfile.TarInfo(f"qqproto-1.0/{name}"), io.BytesIO(b""))
    return path


def test_the_sdist_check_passes_the_packages(source, tmp_path):
    assert dev._check_sdist(_sdist(tmp_path, _SDIST), source) == sorted(_SDIST)


@pytest.mark.parametrize(
    "stray",
    [
        "tests/test_codec.py",
        "tests/conftest.py",
        ".venv/bin/python",
        "build/lib/qqproto/__init__.py",
        "tools/diagram/node_modules/mermaid/package.json",
        "qqproto/__pycache__/__init__.cpython-311.pyc",
        "site/index.html",
    ],
)
def test_the_sdist_check_refuses_what_is_not_the_package(source, tmp_path, stray):
    with pytest.raises(dev.CheckFailed, match=f"must not: {re.escape(stray)}$"):
        dev._check_sdist(_sdist(tmp_path, [*_SDIST, stray]), source)


@pytest.mark.parametrize("lost", ["README.md", "qqproto/py.typed", "qqproto/testing/__init__.py"])
def test_the_sdist_check_wants_every_file_of_the_packages(source, tmp_path, lost):
    with pytest.raises(dev.CheckFailed, match=f"lacks {re.escape(lost)}$"):
        dev._check_sdist(_sdist(tmp_path, [n for n in _SDIST if n != lost]), source)


def _wheel(where: Path, *, drop: str = "", scripts: str | None = None) -> Path:
    """A wheel of the source fixture, its METADATA made of pyproject.toml's claims."""
    info = "qqproto-1.0.dist-info/"
    metadata = [f"Name: qqproto\nVersion: 1.0\nRequires-Python: {PROJECT['requires-python']}"]
    metadata += [f"Classifier: {c}" for c in PROJECT["classifiers"]]
    metadata += [f"Provides-Extra: {e}" for e in PROJECT["optional-dependencies"]]
    if scripts is None:
        scripts = "".join(f"{k} = {v}\n" for k, v in PROJECT["scripts"].items())
    files = dict.fromkeys(_PACKAGE_FILES, "")
    files |= {info + n: "" for n in ("WHEEL", "top_level.txt", "RECORD")}
    files[info + "METADATA"] = "\n".join(metadata) + "\n\nthe README\n"
    files[info + "entry_points.txt"] = f"[console_scripts]\n{scripts}"
    path = where / "qqproto-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, text in files.items():
            if name != drop:
                archive.writestr(name, text)
    return path


def test_the_wheel_check_passes_the_packages_and_the_script(source, tmp_path):
    names, version = dev._check_wheel(_wheel(tmp_path), source)
    assert version == "1.0"
    assert "qqproto/py.typed" in names
    assert "qqproto_io/py.typed" in names


@pytest.mark.parametrize("lost", ["qqproto/py.typed", "qqproto_io/py.typed"])
def test_the_wheel_check_wants_the_typed_markers(source, tmp_path, lost):
    with pytest.raises(dev.CheckFailed, match=f"lacks {re.escape(lost)}$"):
        dev._check_wheel(_wheel(tmp_path, drop=lost), source)


def test_the_wheel_check_wants_the_console_script(source, tmp_path):
    wheel = _wheel(tmp_path, scripts="qqproto = qqproto_io._cli:main\n")
    with pytest.raises(dev.CheckFailed, match="no console script qqproto"):
        dev._check_wheel(wheel, source)


# ------------------------------------------------------------------- other Pythons


def test_a_python_not_on_the_machine_is_skipped_not_failed(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(dev, "PY", Path(sys.executable))
    current = f"{sys.version_info[0]}.{sys.version_info[1]}"
    monkeypatch.setattr(dev, "PYTHONS", (current, "3.99"))
    assert dev.find_python("3.99") is None
    assert dev.check_other_pythons(tmp_path / "qqproto-1.0-py3-none-any.whl", tmp_path)
    out = capsys.readouterr().out
    assert "Python 3.99: SKIPPED: no python3.99 in pyenv or on PATH" in out

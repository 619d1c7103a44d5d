# Every mistake a user can make on the command line gets one line on stderr naming the
# option (or variable) and its value, the documented exit code, and never a traceback. The
# table runs `qqproto_io._cli.main` in this process (the console script's own function); the
# tests that need a real signal or a real port run it as a child process.
"""The qqproto command line: bad input, the fake asked for explicitly, signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from qqproto_io import _cli

CLEAN = {
    k: v for k, v in os.environ.items() if not k.startswith("QQBOT_") and "proxy" not in k.lower()
}

BAD = [
    (["run"], {}, "no credentials: set QQBOT_APP_ID and QQBOT_CLIENT_SECRET"),
    (["run"], {"QQBOT_APP_ID": "1"}, "QQBOT_CLIENT_SECRET (or --client-secret) is missing"),
    (["run"], {"QQBOT_CLIENT_SECRET": "s"}, "QQBOT_APP_ID (or --app-id) is missing"),
    (["run", "--fake", "--seconds", "-1"], {}, "--seconds -1: must be a number of seconds above 0"),
    (["run", "--fake", "--seconds", "soon"], {}, "--seconds soon: must be a number of seconds"),
    (["run", "--fake", "--health-port", "99999"], {}, "--health-port 99999: must be a TCP port"),
    (["run", "--fake", "--proxy", "garbage"], {}, "--proxy garbage: must be a URL"),
    (["run", "--fake", "--shard", "abc"], {}, "--shard abc: must be ID,COUNT"),
    (["run", "--fake", "--shard", "3,2"], {}, "--shard 3,2: must be ID,COUNT with 0 <= ID"),
    (["run", "--fake", "--shards", "x/y"], {}, "--shards x/y: bad shard plan"),
    (["run", "--fake", "--intents", "NOPE"], {}, "--intents NOPE: unknown intent 'NOPE'"),
    (["run", "--fake", "--api-base", "ftp://x"], {}, "--api-base ftp://x: must be an http://"),
    (["run", "--fake", "--redis-url", "http://x"], {}, "--redis-url http://x: must be a redis://"),
    (["run", "--fake"], {"QQBOT_LOG_FORMAT": "xml"}, "QQBOT_LOG_FORMAT=xml: must be text or json"),
    (["run", "--fake"], {"QQBOT_SANDBOX": "yes please"}, "QQBOT_SANDBOX=yes please: must be 1"),
    (["run", "--fake"], {"QQBOT_SHARD": "x"}, "QQBOT_SHARD=x: must be ID,COUNT"),
    (["run", "--fake"], {"QQBOT_HEALTH_PORT": "0"}, "QQBOT_HEALTH_PORT=0: must be a TCP port"),
    (
        ["run", "--app-id", "1", "--client-secret", " "],
        {},
        "--client-secret ***: must not be empty",
    ),
    (["run", "--bogus"], {}, "unrecognized arguments: --bogus"),
    (["simulate", "--minutes", "x"], {}, "--minutes x: must be a number above 0"),
    (["fake-gateway", "--port", "70000"], {}, "--port 70000: must be a TCP port"),
    (["fake-gateway", "--fault", "no_such_fault"], {}, "unknown fault 'no_such_fault'"),
]


@pytest.mark.parametrize(("argv", "env", "message"), BAD, ids=[" ".join(b[0]) for b in BAD])
def test_a_bad_input_is_one_line_and_exit_code_2(argv, env, message, monkeypatch, capsys):
    for name in [k for k in os.environ if k.startswith("QQBOT_") or "proxy" in k.lower()]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    try:
        code = _cli.main(argv)
    except SystemExit as exc:  # argparse's own errors exit through _Parser.error
        code = exc.code
    assert code == _cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("qqproto: ")
    assert message in err
    assert "Traceback" not in err


def test_a_secret_value_is_never_repeated(monkeypatch, capsys):
    monkeypatch.setenv("QQBOT_CLIENT_SECRET", "   ")
    monkeypatch.setenv("QQBOT_APP_ID", "1")
    assert _cli.main(["run"]) == _cli.EXIT_USAGE
    assert capsys.readouterr().err == "qqproto: QQBOT_CLIENT_SECRET=***: must not be empty\n"


def _child(*argv: str, env: dict[str, str] | None = None, timeout: float = 60.0):
    code = f"import sys; from qqproto_io._cli import main; sys.exit(main({list(argv)!r}))"
    return subprocess.run(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**CLEAN, **(env or {})},
        check=False,
    )


@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_a_health_port_in_use_is_a_usage_error(busy_port):
    proc = _child("run", "--fake", "--seconds", "30", "--health-port", str(busy_port))
    assert proc.returncode == _cli.EXIT_USAGE
    assert (
        proc.stderr
        == f"qqproto: --health-port {busy_port}: cannot listen (Address already in use)\n"
    )


def test_a_fake_gateway_port_in_use_is_a_usage_error(busy_port):
    proc = _child("fake-gateway", "--port", str(busy_port))
    assert proc.returncode == _cli.EXIT_USAGE
    assert proc.stderr == f"qqproto: --port {busy_port}: cannot listen (Address already in use)\n"


def test_a_snapshot_path_that_is_a_directory_is_a_usage_error(tmp_path):
    proc = _child("run", "--fake", "--snapshot", str(tmp_path))
    assert proc.returncode == _cli.EXIT_USAGE
    assert proc.stderr == f"qqproto: --snapshot {tmp_path}: is a directory; name a file in it\n"


def test_a_redis_that_does_not_answer_is_a_usage_error(busy_port):
    # A listener that never speaks Redis: the ping times out (bounded), one line.
    url = f"redis://127.0.0.1:{busy_port}/0"
    proc = _child("run", "--fake", "--seconds", "30", "--redis-url", url)
    assert proc.returncode == _cli.EXIT_USAGE
    assert proc.stderr.startswith(f"qqproto: --redis-url {url}: no answer")
    assert proc.stderr.count("\n") == 1


def test_the_fake_is_asked_for_and_says_so():
    proc = _child("demo", "--seconds", "1")
    assert proc.returncode == 0, proc.stderr
    assert "embedded fake gateway" in proc.stdout
    assert "not QQ" in proc.stdout


def test_ctrl_c_while_starting_is_a_clean_stop():
    code = "import sys; from qqproto_io._cli import main; sys.exit(main(['demo']))"
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CLEAN,
    )
    assert proc.stdout is not None
    proc.stdout.readline()  # the first line: start-up is under way
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == _cli.EXIT_OK, err
    assert "Traceback" not in err


def test_fake_gateway_prints_lines_a_shell_can_paste():
    proc = subprocess.Popen(
        [sys.executable, "-c", "from qqproto_io._cli import main; main(['fake-gateway'])"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=CLEAN,
    )
    assert proc.stdout is not None
    lines = [proc.stdout.readline() for _ in range(5)]
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    exports = [line for line in lines if line.startswith("export ")]
    names = [line.split()[1].partition("=")[0] for line in exports]
    assert names == ["QQBOT_API_BASE", "QQBOT_TOKEN_URL", "QQBOT_APP_ID", "QQBOT_CLIENT_SECRET"]
    assert lines[4].startswith("#")


def test_the_console_script_finds_the_app_in_the_current_directory(tmp_path):
    # A console script's sys.path starts with its bin directory, not the current one: without
    # looking there first, `qqproto run --app mybot:setup` next to mybot.py could not import it.
    (tmp_path / "mybot.py").write_text(
        "from pathlib import Path\n\n\n"
        "def setup(client):\n"
        "    Path('setup-called').write_text(type(client).__name__)\n",
        encoding="utf-8",
    )
    script = Path(sys.executable).parent / "qqproto"
    assert script.exists(), "the venv's qqproto console script"
    root = Path(__file__).resolve().parent.parent
    proc = subprocess.run(  # noqa: S603 - our own console script
        [str(script), "run", "--fake", "--app", "mybot:setup", "--seconds", "1"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env={**CLEAN, "PYTHONPATH": str(root)},  # the tree under test; not the cwd
        check=False,
    )
    assert proc.returncode == _cli.EXIT_OK, proc.stderr
    assert (tmp_path / "setup-called").read_text() == "GatewayClient"

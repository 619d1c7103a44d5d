# A bot built on handlers: `client.on(...)` for dispatches and for the session's life,
# `await client.run()` to wait for it, `supervise` (and `qqproto run --app`) to run it as a
# service. Over loopback against the fake gateway, on asyncio and trio; the signal tests run
# a bot as a child process and signal it for real.
"""GatewayClient.run(), lifecycle handlers, FatalStopError and supervise()."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap

import anyio
import pytest

from qqproto import Disconnected, Dispatch, FatalStop, Ready, Resumed
from qqproto_io import FatalStopError
from qqproto_io._fake_server import FakeGatewayServer
from tests.loopback import anyio_backend  # noqa: F401 - fixtures
from tests.test_driver import BOUND, gateway_config, make_client

pytestmark = pytest.mark.anyio


async def test_run_returns_once_a_handler_closes_the_client():
    seen: list[str] = []
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:
            client = make_client(server)

            @client.on(Ready)
            async def ready(event: Ready) -> None:
                seen.append("ready")
                server.message(1)

            @client.on("C2C_MESSAGE_CREATE")
            async def message(event: Dispatch) -> None:
                seen.append(event.type)
                await client.close()

            @client.on(Disconnected)
            async def gone(event: Disconnected) -> None:
                seen.append(f"disconnected {event.code}")

            await client.run()
    assert seen == ["ready", "C2C_MESSAGE_CREATE", "disconnected 4000"]


async def test_lifecycle_handlers_see_a_rotation_and_its_resume():
    seen: list[str] = []
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:
            client = make_client(server)

            @client.on(Ready)
            async def ready(event: Ready) -> None:
                seen.append("ready")
                server.reconnect_all()  # op 7

            @client.on(Resumed)
            async def resumed(event: Resumed) -> None:
                seen.append("resumed")
                await client.close()

            await client.run()
    assert seen == ["ready", "resumed"]


async def test_a_fatal_close_ends_run_with_the_typed_error():
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:
            client = make_client(server)
            fatal: list[FatalStop] = []

            @client.on(Ready)
            async def ready(event: Ready) -> None:
                server.close_all(4014, "intents not permitted")

            @client.on(FatalStop)
            async def stopped(event: FatalStop) -> None:
                fatal.append(event)

            with pytest.raises(FatalStopError) as err:
                await client.run()
    assert err.value.code == 4014
    assert err.value.shard_id == 0
    assert "console" in err.value.hint
    assert "4014" in str(err.value)
    assert len(fatal) == 1  # the FatalStop handler ran before run() raised


async def test_a_failing_handler_is_logged_with_its_event_and_the_session_goes_on(caplog):
    caplog.set_level(logging.ERROR, logger="qqproto_io")
    handled: list[int | None] = []
    with anyio.fail_after(BOUND):
        async with FakeGatewayServer(gateway_config()) as server:
            client = make_client(server)

            @client.on(Ready)
            async def ready(event: Ready) -> None:
                server.message(1)
                server.message(2)

            @client.on("C2C_MESSAGE_CREATE")
            async def message(event: Dispatch) -> None:
                handled.append(event.seq)
                if len(handled) == 1:
                    raise RuntimeError("a bug in the bot")
                await client.close()

            await client.run()
    assert handled == [2, 3]
    (record,) = [r for r in caplog.records if "handler" in r.getMessage()]
    assert "C2C_MESSAGE_CREATE (seq 2" in record.getMessage()
    assert record.exc_info is not None
    assert "a bug in the bot" in str(record.exc_info[1])


BOT = textwrap.dedent(
    """
    import sys
    import anyio
    from qqproto import Ready, SessionConfig
    from qqproto_io import GatewayClient, supervise

    def setup(client):
        @client.on(Ready)
        async def ready(event):
            print("READY", flush=True)

    if __name__ == "__main__":
        app_id, secret, api, token_url = sys.argv[1:]
        client = GatewayClient(
            app_id=app_id, client_secret=secret, api_base=api, token_url=token_url,
            config=SessionConfig(min_heartbeat_interval=0.1),
        )
        setup(client)
        anyio.run(supervise, client)
    """
)


async def _signal_when_ready(argv, env, signum) -> tuple[int, str]:
    async with await anyio.open_process(argv, env=env) as proc:
        assert proc.stdout is not None
        buffer = b""
        async for chunk in proc.stdout:
            buffer += chunk
            if b"READY" in buffer or b'"event": "ready"' in buffer or b"ready:" in buffer:
                break
        proc.send_signal(signum)
        await proc.wait()
        assert proc.stderr is not None
        err = b""
        async for chunk in proc.stderr:
            err += chunk
        return proc.returncode or 0, err.decode()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_supervised_bot_closes_cleanly_on_a_signal(tmp_path, client_closes, signum):
    (tmp_path / "mybot.py").write_text(BOT)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QQBOT_")}
    with anyio.fail_after(60):
        async with FakeGatewayServer(gateway_config()) as server:
            cfg = server.gateway.config
            argv = [
                sys.executable,
                str(tmp_path / "mybot.py"),
                cfg.app_id,
                cfg.client_secret,
                server.http_base,
                server.token_url,
            ]
            code, err = await _signal_when_ready(argv, env, signum)
    assert code == 0, err
    assert "Traceback" not in err
    assert client_closes == [4000]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_qqproto_run_app_runs_your_handlers_under_the_same_supervision(
    tmp_path, client_closes
):
    (tmp_path / "mybot.py").write_text(BOT)
    with anyio.fail_after(60):
        async with FakeGatewayServer(gateway_config()) as server:
            cfg = server.gateway.config
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("QQBOT_")},
                "PYTHONPATH": str(tmp_path),
                "QQBOT_APP_ID": cfg.app_id,
                "QQBOT_CLIENT_SECRET": cfg.client_secret,
                "QQBOT_API_BASE": server.http_base,
                "QQBOT_TOKEN_URL": server.token_url,
            }
            code = "import sys; from qqproto_io._cli import main; sys.exit(main())"
            argv = [sys.executable, "-c", code, "run", "--app", "mybot:setup"]
            status, err = await _signal_when_ready(argv, env, signal.SIGTERM)
    assert status == 0, err
    assert "Traceback" not in err
    assert client_closes == [4000]


def test_qqproto_run_app_names_a_module_that_is_not_there(capsys):
    from qqproto_io import _cli

    code = _cli.main(["run", "--fake", "--app", "no_such_module_here:setup"])
    assert code == _cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("qqproto: --app no_such_module_here:setup: cannot import")
    assert err.count("\n") == 1


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_fatal_stop_through_the_cli_prints_the_hint_and_exits_4():
    # The credentials are wrong (the token endpoint says 100016): no retry, exit code 4.
    with anyio.fail_after(60):
        async with FakeGatewayServer(gateway_config()) as server:
            code = "import sys; from qqproto_io._cli import main; sys.exit(main())"
            argv = [sys.executable, "-c", code, "run", "--app-id", server.gateway.config.app_id]
            argv += ["--api-base", server.http_base, "--token-url", server.token_url]
            env = {k: v for k, v in os.environ.items() if not k.startswith("QQBOT_")}
            env["QQBOT_CLIENT_SECRET"] = "wrong"
            proc = await anyio.run_process(argv, env=env, check=False)
    err = proc.stderr.decode()
    assert proc.returncode == 4, err
    assert err.startswith("qqproto: stopped by the gateway: the token endpoint rejected")
    assert "QQBOT_CLIENT_SECRET" in err
    assert "Traceback" not in err


def test_the_deploy_pages_bot_runs_against_the_fake_gateway(tmp_path):
    # docs/deploy.md's mybot.py, as the page shows it, under `qqproto run --fake --app`.
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parent.parent / "docs" / "deploy.md").read_text()
    source = re.search(r"`/opt/mybot/mybot.py`:\n\n```python\n(.*?)```", page, re.DOTALL)
    assert source is not None
    (tmp_path / "mybot.py").write_text(source.group(1))
    env = {k: v for k, v in os.environ.items() if not k.startswith("QQBOT_")}
    env["PYTHONPATH"] = str(tmp_path)
    code = "import sys; from qqproto_io._cli import main; sys.exit(main())"
    argv = [sys.executable, "-c", code, "run", "--fake", "--app", "mybot:setup"]
    proc = subprocess.run(  # noqa: S603 - our own interpreter
        [*argv, "--seconds", "7"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert "ready: session" in proc.stdout
    assert "handler" not in proc.stdout + proc.stderr  # no handler failed (the reply went out)

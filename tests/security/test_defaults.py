"""Safe defaults of ``taskmanager run`` (issue 7): it listens on loopback unless told
otherwise, never signs with a published secret, and a placeholder secret is refused whenever
the listener is reachable from other machines, whatever ``APP_ENV`` says."""

from __future__ import annotations

import logging
import signal
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import structlog
from bson import ObjectId
from click.testing import CliRunner, Result
from pydantic import ValidationError

from cli.embedded import free_port
from cli.main import main
from cli.processes import DevSettings
from config.settings import PUBLISHED_DEV_SECRET, Settings
from tests.conftest import bearer, register
from tests.e2e.helpers import clean_env, start, wait_http
from web.keys import SETTINGS

#: Variables a developer's shell (or the suite) might set that would change the defaults.
_VARS = ("HOST", "JWT_SECRET", "APP_ENV", "MONGODB_URL", "REDIS_URL", "BROKER_URL", "PORT")


@pytest.fixture
def bare_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No product variable set; logging and SIGTERM handling restored afterwards (``run``
    configures both process-wide, as an entry point should)."""
    for name in _VARS:
        monkeypatch.delenv(name, raising=False)
    root = logging.getLogger()
    handlers, level, config = root.handlers[:], root.level, structlog.get_config()
    term = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, term)
    root.handlers[:] = handlers
    root.setLevel(level)
    structlog.configure(**config)
    logging.captureWarnings(False)


def forged(role: str = "admin", sub: str | None = None) -> str:
    """An access token signed with the development secret earlier versions published."""
    now = int(time.time())
    return jwt.encode(
        {
            "iss": "taskmanager",
            "aud": "taskmanager-api",
            "sub": sub or str(ObjectId()),
            "sid": "forged-login",
            "jti": "forged-jti",
            "type": "access",
            "role": role,
            "iat": now,
            "nbf": now,
            "exp": now + 600,
        },
        PUBLISHED_DEV_SECRET,
        algorithm="HS256",
        headers={"typ": "at+jwt"},
    )


class Served:
    """What ``taskmanager run`` handed to ``web.app.serve`` instead of serving."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, app: Any, **kwargs: Any) -> None:
        self.calls.append({"settings": app[SETTINGS], **kwargs})


def run_cli(monkeypatch: pytest.MonkeyPatch, mongo_url: str, *args: str) -> tuple[Result, Served]:
    """``taskmanager run ARGS`` in this process against the test MongoDB (no embedded
    server), stopping where it would start serving."""
    import web.app

    served = Served()
    monkeypatch.setattr(web.app, "serve", served)
    monkeypatch.setenv("MONGODB_URL", mongo_url)
    monkeypatch.setenv("MONGODB_DB", f"t_run_{ObjectId()}")
    result = CliRunner().invoke(main, ["run", "--worker-threads", "1", *args])
    return result, served


def test_run_listens_on_loopback_and_keeps_its_secret_in_the_data_dir(
    bare_env: None, monkeypatch: pytest.MonkeyPatch, mongo_url: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    first, served = run_cli(monkeypatch, mongo_url, "--data-dir", str(data))
    assert first.exit_code == 0, first.output
    [call] = served.calls
    assert call["host"] == "127.0.0.1"
    assert "http://127.0.0.1:8000" in first.output  # the banner says where it really listens
    secret_file = data / "jwt-secret"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    secret = call["settings"].jwt_secret.get_secret_value()
    assert secret == secret_file.read_text().strip()
    assert len(secret) >= 32 and secret != PUBLISHED_DEV_SECRET
    assert "made and kept in" in first.output

    again, served_again = run_cli(monkeypatch, mongo_url, "--data-dir", str(data))
    assert again.exit_code == 0, again.output
    assert served_again.calls[0]["settings"].jwt_secret.get_secret_value() == secret  # reused

    # --memory: nothing persists, so a fresh secret per start and no file.
    memory, served_memory = run_cli(
        monkeypatch, mongo_url, "--memory", "--data-dir", str(tmp_path / "other")
    )
    assert memory.exit_code == 0, memory.output
    fresh = served_memory.calls[0]["settings"].jwt_secret.get_secret_value()
    assert fresh not in (secret, PUBLISHED_DEV_SECRET) and len(fresh) >= 32
    assert not (tmp_path / "other" / "jwt-secret").exists()


def test_run_honours_an_explicit_host_and_shows_it(
    bare_env: None, monkeypatch: pytest.MonkeyPatch, mongo_url: str, tmp_path: Path
) -> None:
    monkeypatch.setenv("HOST", "0.0.0.0")
    refused, served = run_cli(monkeypatch, mongo_url, "--data-dir", str(tmp_path))
    # Reachable from other machines: no made-up secret, a real one is required.
    assert refused.exit_code == 1, refused.output
    assert "JWT_SECRET" in refused.output and "0.0.0.0" in refused.output
    assert not served.calls

    monkeypatch.setenv("JWT_SECRET", "s" * 40)
    result, served = run_cli(monkeypatch, mongo_url, "--data-dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert served.calls[0]["host"] == "0.0.0.0"
    assert "http://0.0.0.0:8000" in result.output and "other machines" in result.output


@pytest.mark.parametrize("env", ["development", "test", "production"])
@pytest.mark.parametrize(
    "secret",
    [None, "", "change-me", PUBLISHED_DEV_SECRET, "CHANGE-ME-openssl-rand-hex-32", "short"],
)
def test_placeholder_secret_refused_on_a_non_loopback_host(
    bare_env: None, env: str, secret: str | None
) -> None:
    values: dict[str, Any] = {"app_env": env, "host": "0.0.0.0"}
    if secret is not None:
        values["jwt_secret"] = secret
    for cls in (Settings, DevSettings):
        with pytest.raises(ValidationError, match="JWT_SECRET"):
            cls(**values)


def test_the_published_dev_secret_is_never_a_signing_key(bare_env: None) -> None:
    # Not even on loopback in development: it is refused, or (under `run`) replaced.
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(app_env="development", host="127.0.0.1", jwt_secret=PUBLISHED_DEV_SECRET)
    with pytest.raises(ValidationError, match="unset"):
        Settings(app_env="development", host="127.0.0.1")
    dev = DevSettings(jwt_secret=PUBLISHED_DEV_SECRET)
    assert dev.jwt_secret_generated
    assert dev.jwt_secret.get_secret_value() != PUBLISHED_DEV_SECRET
    # A real secret is used as given.
    assert not DevSettings(jwt_secret="r" * 40).jwt_secret_generated
    assert Settings(host="0.0.0.0", jwt_secret="r" * 40).jwt_secret.get_secret_value() == "r" * 40


async def test_token_forged_with_the_published_secret_is_refused_by_a_run_app(
    bare_env: None, make_settings: Any, aiohttp_client: Any
) -> None:
    from web.app import create_app

    base = make_settings()  # the test database and Redis prefix (cleaned up after)
    for secret in (None, PUBLISHED_DEV_SECRET):
        values: dict[str, Any] = {
            "mongodb_url": base.mongodb_url,
            "mongodb_db": base.mongodb_db,
            "redis_url": base.redis_url,
            "redis_prefix": base.redis_prefix,
        }
        if secret is not None:
            values["jwt_secret"] = secret
        settings = DevSettings(**values)  # what `taskmanager run` builds
        client = await aiohttp_client(create_app(settings))
        victim = await register(client)
        resp = await client.get("/api/v1/admin/workers", headers=bearer(forged()))
        assert resp.status == 401, await resp.text()
        resp = await client.get(
            "/api/v1/me", headers=bearer(forged("user", sub=victim["user"]["id"]))
        )
        assert resp.status == 401
        # The app's own tokens work.
        resp = await client.get("/api/v1/me", headers=bearer(victim["access_token"]))
        assert resp.status == 200
        await client.close()


@pytest.mark.timeout(120)
async def test_run_process_binds_loopback_only(tmp_path: Path) -> None:
    """The real process with no HOST: every listening socket on its port is 127.0.0.1."""
    port = free_port()
    proc = start(
        ["run", "--memory", "--port", str(port)], clean_env(LOG_FORMAT="json"), cwd=str(tmp_path)
    )
    try:
        await wait_http(proc, f"http://127.0.0.1:{port}/healthz", timeout=60)
        listening = _listening(port)
        assert listening, f"nothing listens on {port}\n{proc.describe()}"
        assert listening <= {"127.0.0.1", "::1"}, listening
        assert f"http://127.0.0.1:{port}" in proc.output()
    finally:
        proc.close()


def _listening(port: int) -> set[str]:
    """Local addresses of the sockets listening on ``port`` (Linux ``/proc/net``)."""
    import ipaddress

    found = set()
    for table, width in (("/proc/net/tcp", 8), ("/proc/net/tcp6", 32)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) != port or fields[3] != "0A":  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # The kernel prints each 32-bit word in host (little-endian) order.
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(words) if width == 8 else ipaddress.IPv6Address(words)
            mapped = getattr(ip, "ipv4_mapped", None)
            found.add(str(mapped or ip))
    return found

"""`iopnet run` hands its services a secret that came from a file as that file, never as
its value in their environment (docker inspect, /proc/<pid>/environ)."""

from pathlib import Path

import pytest

from iopnet.network import LocalNetwork
from shared.settings import Settings

SECRET = "s" * 48


def test_a_jwt_secret_from_a_file_reaches_the_services_as_the_file(tmp_path: Path, monkeypatch) -> None:
    secret_file = tmp_path / "jwt.secret"
    secret_file.write_text(SECRET)
    monkeypatch.delenv("IOPNET_JWT_SECRET", raising=False)
    settings = Settings(data_dir=tmp_path / "data", nats_url="nats://127.0.0.1:4999", jwt_secret_file=secret_file)
    env = LocalNetwork(settings).child_env("intake")
    assert env["IOPNET_JWT_SECRET_FILE"] == str(secret_file)
    assert "IOPNET_JWT_SECRET" not in env
    assert SECRET not in "".join(env.values())


def test_a_jwt_secret_given_as_a_value_stays_a_value(tmp_path: Path, monkeypatch) -> None:
    settings = Settings(data_dir=tmp_path / "data", nats_url="nats://127.0.0.1:4999", jwt_secret=SECRET)
    network = LocalNetwork(settings)
    monkeypatch.setenv("IOPNET_JWT_SECRET_FILE", str(tmp_path / "stale"))  # in the parent's environment only
    env = network.child_env("scheduling")
    assert env["IOPNET_JWT_SECRET"] == SECRET
    assert "IOPNET_JWT_SECRET_FILE" not in env


def test_the_console_gets_its_port_the_development_sign_in_and_no_service_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`iopnet run` runs the console beside the services: on console_port, the demo users'
    sign-in on (no identity provider here), the JWT secret (it mints their tokens and
    derives its session key) but none of the services' databases, contact details account,
    mail or SMS credentials."""
    monkeypatch.delenv("IOPNET_CONSOLE_DEV_SIGNIN", raising=False)
    monkeypatch.setenv("IOPNET_SMTP_PASSWORD", "smtp-pw")
    settings = Settings(
        data_dir=tmp_path / "data",
        nats_url="nats://127.0.0.1:4999",
        nats_restricted_url="nats://restricted:pw@127.0.0.1:4999",
        intake_database_url="postgresql+asyncpg://intake:db-pw@127.0.0.1/intake",
        jwt_secret=SECRET,
        console_port=8123,
    )
    network = LocalNetwork(settings, console=True)
    assert network.url("console") == "http://127.0.0.1:8123"
    env = network.child_env("console")
    assert env["IOPNET_CONSOLE_PORT"] == "8123" and env["IOPNET_CONSOLE_DEV_SIGNIN"] == "true"
    assert env["IOPNET_NATS_URL"] == "nats://127.0.0.1:4999" and env["IOPNET_JWT_SECRET"] == SECRET
    assert env["IOPNET_SCHEDULING_URL"] == network.url("scheduling") == settings.base_url("scheduling")
    assert not [k for k in env if "DATABASE" in k or "RESTRICTED" in k or k.startswith(("IOPNET_SMTP_P", "IOPNET_SMS"))]
    assert "db-pw" not in "".join(env.values()) and "smtp-pw" not in "".join(env.values())
    assert network.child_env("intake")["IOPNET_NATS_RESTRICTED_URL"].startswith("nats://restricted:")
    assert "console" not in LocalNetwork(settings).instances, "only `iopnet run` asks for it"


def test_an_explicit_development_sign_in_setting_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOPNET_CONSOLE_DEV_SIGNIN", "false")
    settings = Settings(data_dir=tmp_path / "data", nats_url="nats://127.0.0.1:4999", jwt_secret=SECRET)
    assert LocalNetwork(settings, console=True).child_env("console")["IOPNET_CONSOLE_DEV_SIGNIN"] == "false"


def test_a_service_url_given_for_a_network_of_containers() -> None:
    settings = Settings(http_host="0.0.0.0", intake_url="http://intake:8001/", jwt_secret=SECRET)
    assert settings.base_url("intake") == "http://intake:8001"
    assert settings.base_url("scheduling") == "http://0.0.0.0:8002", "unset: the local network's"

"""`iopnet run` hands its services a secret that came from a file as that file, never as
its value in their environment (docker inspect, /proc/<pid>/environ)."""

from pathlib import Path

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

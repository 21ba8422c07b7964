"""IOPNET_*_FILE: secrets read from files (compose secrets, Kubernetes Secret volumes),
never from the environment or a URL given in it (shared/settings.py)."""

from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy.engine import make_url

from shared.settings import Settings

SECRET = "s" * 40


def _file(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content)
    return path


def test_jwt_secret_from_a_file_without_its_final_newline(tmp_path: Path) -> None:
    settings = Settings(jwt_secret_file=_file(tmp_path, "jwt", SECRET + "\n"), data_dir=tmp_path / "data")
    assert settings.signing_secret == SECRET
    assert not (tmp_path / "data" / "jwt.secret").exists(), "no generated secret beside the given one"


def test_jwt_secret_file_is_read_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IOPNET_JWT_SECRET_FILE", str(_file(tmp_path, "jwt", SECRET)))
    monkeypatch.setenv("IOPNET_NATS_URL", "nats://intake@nats:4222")
    monkeypatch.setenv("IOPNET_NATS_PASSWORD_FILE", str(_file(tmp_path, "nats", "pw-1_x")))
    settings = Settings()
    assert settings.jwt_secret == SECRET
    assert settings.effective_nats_url == "nats://intake:pw-1_x@nats:4222"


def test_a_short_jwt_secret_in_a_file_is_refused_without_echoing_it(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as refused:
        Settings(jwt_secret_file=_file(tmp_path, "jwt", "short-secret"))
    assert "at least 32" in str(refused.value)
    assert "short-secret" not in str(refused.value)


@pytest.mark.parametrize("content", ["", "\n"])
def test_an_empty_secret_file_is_refused(tmp_path: Path, content: str) -> None:
    with pytest.raises(ValidationError, match="is empty"):
        Settings(jwt_secret_file=_file(tmp_path, "jwt", content))


def test_a_missing_secret_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="cannot read the secret file"):
        Settings(jwt_secret_file=tmp_path / "absent")


def test_a_secret_given_both_ways_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="both set"):
        Settings(jwt_secret=SECRET, jwt_secret_file=_file(tmp_path, "jwt", SECRET))
    with pytest.raises(ValidationError, match="both set"):
        Settings(smtp_password="x", smtp_password_file=_file(tmp_path, "smtp", "y"))


def test_database_password_file_completes_the_url_percent_encoded(tmp_path: Path) -> None:
    password = "p@ss:w/rd%?#"
    settings = Settings(
        jwt_secret=SECRET,
        scheduling_database_url="postgresql+asyncpg://scheduling@postgres:5432/scheduling",
        scheduling_database_password_file=_file(tmp_path, "db", password + "\n"),
    )
    url = make_url(settings.database_url("scheduling"))
    assert (url.username, url.password, url.host, url.port, url.database) == (
        "scheduling",
        password,
        "postgres",
        5432,
        "scheduling",
    )
    assert settings.database_url("intake").startswith("sqlite+aiosqlite:///"), "other services untouched"


def test_restricted_nats_url_gets_its_own_password(tmp_path: Path) -> None:
    settings = Settings(
        jwt_secret=SECRET,
        nats_url="nats://notifications@nats:4222",
        nats_password_file=_file(tmp_path, "main", "main-pw"),
        nats_restricted_url="nats://notifications-restricted@nats:4222",
        nats_restricted_password_file=_file(tmp_path, "restricted", "restricted-pw"),
    )
    assert settings.nats_url == "nats://notifications:main-pw@nats:4222"
    assert settings.nats_restricted_url == "nats://notifications-restricted:restricted-pw@nats:4222"


@pytest.mark.parametrize(
    ("url", "error"),
    [
        (None, "needs IOPNET_NATS_URL"),
        ("nats://nats:4222", "names no user"),
        ("nats://intake:inline@nats:4222", "already holds a password"),
    ],
)
def test_a_password_file_needs_a_url_with_a_user_and_no_password(tmp_path: Path, url: str | None, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        Settings(jwt_secret=SECRET, nats_url=url, nats_password_file=_file(tmp_path, "nats", "pw"))


@pytest.mark.parametrize("password", ["a@b", "a:b", "a/b", "a b", "a%41"])
def test_a_nats_password_that_a_url_cannot_carry_as_is_is_refused(tmp_path: Path, password: str) -> None:
    with pytest.raises(ValidationError, match="NATS password may not hold") as refused:
        Settings(jwt_secret=SECRET, nats_url="nats://ops@nats:4222", nats_password_file=_file(tmp_path, "n", password))
    assert password not in str(refused.value)


def test_smtp_password_and_sms_key_from_files(tmp_path: Path) -> None:
    settings = Settings(
        jwt_secret=SECRET,
        smtp_password_file=_file(tmp_path, "smtp", "smtp-secret\n"),
        sms_api_key_file=_file(tmp_path, "sms", "sms-key"),
    )
    assert (settings.smtp_password, settings.sms_api_key) == ("smtp-secret", "sms-key")


def test_the_consoles_session_secret_and_oidc_client_secret_from_files(tmp_path: Path) -> None:
    session = "k" * 48
    settings = Settings(
        jwt_secret=SECRET,
        console_session_secret_file=_file(tmp_path, "session", session + "\n"),
        oidc_client_secret_file=_file(tmp_path, "oidc", "client-secret"),
    )
    assert (settings.console_session_secret, settings.oidc_client_secret) == (session, "client-secret")
    with pytest.raises(ValidationError, match="both set"):
        Settings(console_session_secret=session, console_session_secret_file=_file(tmp_path, "s2", session))


def test_a_short_console_session_secret_is_refused_without_echoing_it(tmp_path: Path) -> None:
    for given in (
        {"console_session_secret": "short-session"},
        {"console_session_secret_file": _file(tmp_path, "s", "short-session")},
    ):
        with pytest.raises(ValidationError, match="at least 32") as refused:
            Settings(jwt_secret=SECRET, **given)
        assert "short-session" not in str(refused.value)

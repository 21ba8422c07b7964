"""JWT auth and site scoping (DESIGN A3)."""

from datetime import UTC, datetime, timedelta
from uuid import uuid4

import jwt
import pytest
from pydantic import ValidationError

from shared.auth import (
    ALGORITHM,
    AUDIENCE,
    ISSUER,
    MAX_SUB_LENGTH,
    MAX_TTL_SECONDS,
    ROLES,
    Principal,
    decode_token,
    ensure_site,
    mint_token,
)
from shared.errors import NotFound, Unauthorized

SECRET = "unit-test-secret-" + "s" * 32


def _claims(**overrides):
    now = datetime.now(UTC)
    claims = {"sub": "u1", "role": "clinician", "sites": ["columbus-east"], "iss": ISSUER, "aud": AUDIENCE, "iat": now}
    claims["exp"] = now + timedelta(minutes=5)
    claims.update(overrides)
    return {k: v for k, v in claims.items() if v is not None}


def _encode(secret=SECRET, **overrides):
    return jwt.encode(_claims(**overrides), secret, algorithm=ALGORITHM)


@pytest.mark.parametrize("role", [r for r in ROLES if r != "patient"])
def test_round_trip(role):
    token = mint_token(SECRET, sub="staff-7", role=role, sites=["columbus-east", "dayton-north"])
    principal = decode_token(SECRET, token)
    assert principal == Principal(sub="staff-7", role=role, sites=["columbus-east", "dayton-north"])


def test_round_trip_patient():
    patient_id = uuid4()
    token = mint_token(SECRET, sub="pat-1", role="patient", sites=["columbus-east"], patient_id=patient_id)
    principal = decode_token(SECRET, token)
    assert principal.role == "patient"
    assert principal.patient_id == patient_id
    assert principal.sites == ["columbus-east"]


def test_patient_id_as_string_accepted():
    patient_id = uuid4()
    token = mint_token(SECRET, sub="pat-1", role="patient", patient_id=str(patient_id))
    assert decode_token(SECRET, token).patient_id == patient_id


def test_default_sites_is_empty():
    assert decode_token(SECRET, mint_token(SECRET, sub="a", role="network_admin")).sites == []


def test_token_carries_issuer_audience_and_expiry() -> None:
    token = mint_token(SECRET, sub="a", role="clinician", ttl_seconds=60)
    claims = jwt.decode(token, SECRET, algorithms=[ALGORITHM], audience=AUDIENCE, issuer=ISSUER)
    assert claims["iss"] == ISSUER
    assert claims["aud"] == AUDIENCE
    assert 0 < claims["exp"] - claims["iat"] <= 60


def test_minted_issuer_and_audience_follow_the_arguments() -> None:
    token = mint_token(SECRET, sub="a", role="clinician", issuer="clinic-idp", audience="iop-api")
    assert decode_token(SECRET, token, issuer="clinic-idp", audience="iop-api").sub == "a"
    with pytest.raises(Unauthorized):
        decode_token(SECRET, token)  # the defaults: another issuer and audience


def test_defaults_match_the_settings_defaults() -> None:
    from shared.settings import Settings

    settings = Settings(jwt_secret=SECRET)
    assert (
        settings.jwt_issuer,
        settings.jwt_audience,
        settings.jwt_max_ttl_seconds,
    ) == (ISSUER, AUDIENCE, MAX_TTL_SECONDS)


def test_patient_token_without_patient_id_rejected_by_mint():
    with pytest.raises(ValueError, match="patient_id"):
        mint_token(SECRET, sub="pat-1", role="patient")


def test_expired_token_unauthorized():
    token = mint_token(SECRET, sub="a", role="clinician", ttl_seconds=-10)
    with pytest.raises(Unauthorized):
        decode_token(SECRET, token)


def test_wrong_secret_unauthorized():
    token = mint_token(SECRET, sub="a", role="clinician")
    with pytest.raises(Unauthorized):
        decode_token("another-secret-" + "o" * 32, token)


@pytest.mark.parametrize("role", ["admin", "superuser", "", "Network_Admin"])
def test_bad_role_unauthorized(role):
    with pytest.raises(Unauthorized):
        decode_token(SECRET, _encode(role=role))


def test_hand_made_valid_token_accepted():
    assert decode_token(SECRET, _encode()).role == "clinician"


@pytest.mark.parametrize(
    "token",
    [
        pytest.param(_encode(aud="someone-else"), id="wrong-audience"),
        pytest.param(_encode(aud=None), id="no-audience"),
        pytest.param(_encode(iss="someone-else"), id="wrong-issuer"),
        pytest.param(_encode(iss=None), id="no-issuer"),
        pytest.param(_encode(exp=None), id="no-expiry"),
        pytest.param(_encode(iat=None), id="no-issued-at"),
        pytest.param(_encode(sub="s" * (MAX_SUB_LENGTH + 1)), id="subject-over-audit-column"),
        pytest.param(_encode(sub="s" * 60_000), id="subject-60kb"),
        pytest.param(_encode(sub=None), id="no-subject"),
        pytest.param(_encode(sub=""), id="empty-subject"),
        pytest.param(_encode(role=None), id="no-role"),
        pytest.param(_encode(sites="columbus-east"), id="sites-not-a-list"),
        pytest.param(_encode(role="patient"), id="patient-without-patient-id"),
        pytest.param(_encode(role="patient", patient_id="not-a-uuid"), id="patient-id-not-uuid"),
        pytest.param("not.a.jwt", id="garbage"),
        pytest.param("", id="empty"),
    ],
)
def test_invalid_tokens_unauthorized(token):
    with pytest.raises(Unauthorized):
        decode_token(SECRET, token)


def _lifetime_token(lifetime: timedelta, age: timedelta = timedelta(0)) -> str:
    """A token issued `age` ago, valid for `lifetime` from its issue."""
    iat = datetime.now(UTC) - age
    return _encode(iat=iat, exp=iat + lifetime)


def test_token_lifetime_over_the_maximum_unauthorized() -> None:
    token = _lifetime_token(timedelta(seconds=MAX_TTL_SECONDS + 1))
    with pytest.raises(Unauthorized, match="lifetime"):
        decode_token(SECRET, token)


def test_old_long_lived_token_unauthorized_though_unexpired() -> None:
    # Issued 30 days ago for a year: still within exp, refused for its lifetime.
    token = _lifetime_token(timedelta(days=365), age=timedelta(days=30))
    with pytest.raises(Unauthorized):
        decode_token(SECRET, token)


def test_token_lifetime_at_the_maximum_accepted() -> None:
    token = _lifetime_token(timedelta(seconds=MAX_TTL_SECONDS))
    assert decode_token(SECRET, token).sub == "u1"


def test_maximum_lifetime_is_a_parameter() -> None:
    token = _lifetime_token(timedelta(hours=2))
    assert decode_token(SECRET, token, max_ttl_seconds=2 * 3600).sub == "u1"
    with pytest.raises(Unauthorized):
        decode_token(SECRET, token, max_ttl_seconds=3600)


def test_minted_token_over_a_lower_maximum_unauthorized() -> None:
    token = mint_token(SECRET, sub="a", role="clinician", ttl_seconds=3600)
    with pytest.raises(Unauthorized):
        decode_token(SECRET, token, max_ttl_seconds=60)


def test_issued_in_the_future_unauthorized() -> None:
    iat = datetime.now(UTC) + timedelta(hours=1)
    with pytest.raises(Unauthorized):
        decode_token(SECRET, _encode(iat=iat, exp=iat + timedelta(minutes=5)))


def test_subject_at_the_audit_column_length_accepted() -> None:
    sub = "s" * MAX_SUB_LENGTH
    assert decode_token(SECRET, _encode(sub=sub)).sub == sub


def test_unsigned_token_unauthorized():
    token = jwt.encode(_claims(role="network_admin"), key=None, algorithm="none")
    with pytest.raises(Unauthorized):
        decode_token(SECRET, token)


def test_unauthorized_is_401():
    with pytest.raises(Unauthorized) as caught:
        decode_token(SECRET, "garbage")
    assert caught.value.status == 401


def test_network_admin_sees_every_site():
    admin = Principal(sub="a", role="network_admin", sites=["columbus-east"])
    assert admin.sees_site("columbus-east")
    assert admin.sees_site("anywhere-else")
    assert admin.visible_sites() is None
    assert admin.visible_sites(["x-1", "y-2"]) == ["x-1", "y-2"]
    assert admin.visible_sites([]) == []


@pytest.mark.parametrize("role", [r for r in ROLES if r != "network_admin"])
def test_other_roles_see_their_sites_only(role):
    principal = Principal(sub="a", role=role, sites=["columbus-east", "dayton-north"], patient_id=uuid4())
    assert principal.sees_site("columbus-east")
    assert principal.sees_site("dayton-north")
    assert not principal.sees_site("akron-south")
    assert principal.visible_sites() == ["columbus-east", "dayton-north"]
    assert principal.visible_sites(["akron-south", "dayton-north"]) == ["dayton-north"]
    assert principal.visible_sites(["akron-south"]) == []


def test_site_admin_without_sites_sees_nothing():
    principal = Principal(sub="a", role="site_admin")
    assert not principal.sees_site("columbus-east")
    assert principal.visible_sites() == []
    assert principal.visible_sites(["columbus-east"]) == []


def test_empty_candidates_give_no_sites():
    principal = Principal(sub="a", role="clinician", sites=["columbus-east"])
    assert principal.visible_sites([]) == []


def test_ensure_site_allows_own_site():
    principal = Principal(sub="a", role="front_desk", sites=["columbus-east"])
    assert ensure_site(principal, "columbus-east") is None


def test_ensure_site_raises_not_found_for_other_site():
    principal = Principal(sub="a", role="front_desk", sites=["columbus-east"])
    with pytest.raises(NotFound) as caught:
        ensure_site(principal, "dayton-north", what="patient")
    assert caught.value.status == 404
    assert "patient" in caught.value.message
    assert "dayton-north" not in caught.value.message


def test_ensure_site_lets_network_admin_through():
    assert ensure_site(Principal(sub="a", role="network_admin"), "dayton-north") is None


# --- a verified token is kept while it lasts (issue 10) -------------------------------------


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The tokens PyJWT is asked to verify, from now on."""
    seen: list[str] = []
    real = jwt.decode

    def spy(token, *args, **kwargs):
        seen.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr("shared.auth.jwt.decode", spy)
    return seen


def test_a_token_is_verified_once_while_it_lasts(decodes: list[str]) -> None:
    token = mint_token(SECRET, sub="kept-1", role="clinician", sites=["columbus-east"])
    callers = [decode_token(SECRET, token) for _ in range(3)]
    assert decodes == [token]
    assert callers[0] == callers[2] == Principal(sub="kept-1", role="clinician", sites=["columbus-east"])


def test_a_kept_token_is_refused_once_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    token = mint_token(SECRET, sub="kept-2", role="clinician", ttl_seconds=60)
    assert decode_token(SECRET, token).sub == "kept-2"
    later = datetime.now(UTC).timestamp() + 61
    monkeypatch.setattr("shared.auth.time.time", lambda: later)
    with pytest.raises(Unauthorized):
        decode_token(SECRET, token)


def test_a_kept_token_passes_only_the_check_it_passed() -> None:
    token = mint_token(SECRET, sub="kept-3", role="clinician", ttl_seconds=3600)
    assert decode_token(SECRET, token).sub == "kept-3"
    checks = [
        lambda: decode_token("another-secret-" + "o" * 32, token),
        lambda: decode_token(SECRET, token, audience="someone-else"),
        lambda: decode_token(SECRET, token, issuer="someone-else"),
        lambda: decode_token(SECRET, token, max_ttl_seconds=60),
    ]
    for check in checks:
        with pytest.raises(Unauthorized):
            check()


def test_an_invalid_token_is_checked_every_time(decodes: list[str]) -> None:
    token = _encode(secret="another-secret-" + "o" * 32, sub="kept-4")
    for _ in range(2):
        with pytest.raises(Unauthorized):
            decode_token(SECRET, token)
    assert decodes == [token, token]


def test_a_caller_cannot_be_changed_once_verified() -> None:
    principal = decode_token(SECRET, mint_token(SECRET, sub="kept-5", role="clinician", sites=["columbus-east"]))
    with pytest.raises(ValidationError):
        principal.role = "network_admin"  # type: ignore[misc]

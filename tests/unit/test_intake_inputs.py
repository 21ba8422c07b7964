"""Intake's boundary types (services/intake/api.py): what a request may hold, checked by
pydantic before a handler runs, so bad input is a 422 and never a 500 or a silent 200."""

from datetime import UTC, date, datetime, timedelta, timezone

import pytest
from pydantic import TypeAdapter, ValidationError

from services.intake.api import AwareDatetime, GoalChange, IsoDate, PatientChange, PatientIn, SiteChange

AWARE = TypeAdapter(AwareDatetime)
ISO_DATE = TypeAdapter(IsoDate)


@pytest.mark.parametrize(
    ("text", "utc"),
    [
        ("2026-03-09T09:00:00-05:00", datetime(2026, 3, 9, 14, tzinfo=UTC)),
        ("2026-03-09T09:00:00Z", datetime(2026, 3, 9, 9, tzinfo=UTC)),
        ("2026-03-09 09:00:00.250+14:00", datetime(2026, 3, 8, 19, 0, 0, 250000, tzinfo=UTC)),
        ("1900-01-01T00:00:00+14:00", datetime(1899, 12, 31, 10, tzinfo=UTC)),
        ("2199-12-31T23:59:59-14:00", datetime(2200, 1, 1, 13, 59, 59, tzinfo=UTC)),
    ],
)
def test_an_rfc3339_time_in_range_is_read_as_utc(text, utc):
    value = AWARE.validate_python(text)
    assert value == utc and value.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "value",
    [
        "2020-01-01T00:00:00",  # no offset: which site's clock?
        "2020-01-01",
        "0001-01-01T00:00:00+14:00",  # overflows on conversion to UTC
        "9999-12-31T23:59:59-14:00",
        "1899-12-31T23:59:59Z",
        "2200-01-01T00:00:00Z",
        "0.5",  # lax pydantic: seconds since 1970
        "0",
        "1e10",
        0,
        0.5,
        "",
        "2020-01-01T00:00:00+25:00",
        "2020-13-01T00:00:00Z",
        " 2020-01-01T00:00:00Z",
    ],
)
def test_anything_else_is_refused(value):
    with pytest.raises(ValidationError):
        AWARE.validate_python(value)


def test_a_python_datetime_is_taken_as_is_if_aware():
    berlin = timezone(timedelta(hours=1))
    assert AWARE.validate_python(datetime(2026, 1, 1, 12, tzinfo=berlin)) == datetime(2026, 1, 1, 11, tzinfo=UTC)
    with pytest.raises(ValidationError):
        AWARE.validate_python(datetime(2026, 1, 1, 12))
    with pytest.raises(ValidationError):
        AWARE.validate_python(datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=14))))


@pytest.mark.parametrize("value", ["0", "1", "0.5", "1e5", 0, 19000, "2020-1-1", "20200101", "2020-02-30", ""])
def test_a_date_is_yyyy_mm_dd_text_only(value):
    with pytest.raises(ValidationError):
        ISO_DATE.validate_python(value)


def test_an_iso_date_is_read():
    assert ISO_DATE.validate_python("1991-07-04") == date(1991, 7, 4)
    assert ISO_DATE.validate_python(date(1991, 7, 4)) == date(1991, 7, 4)


@pytest.mark.parametrize(
    ("model", "field"),
    [
        (SiteChange, "name"),
        (SiteChange, "timezone"),
        (GoalChange, "text"),
        (GoalChange, "status"),
        (PatientChange, "given_name"),
        (PatientChange, "family_name"),
        (PatientChange, "birth_date"),
        (PatientChange, "preferred_channel"),
        (PatientChange, "language"),
    ],
)
def test_a_change_may_leave_a_required_field_out_but_not_clear_it(model, field):
    assert getattr(model.model_validate({}), field) is None
    with pytest.raises(ValidationError) as caught:
        model.model_validate({field: None})
    assert "null" in caught.value.errors()[0]["msg"]


@pytest.mark.parametrize("model", [GoalChange])
def test_optional_fields_can_still_be_cleared(model):
    assert model.model_validate({"target": None, "review_on": None}).target is None


@pytest.mark.parametrize("name", ["\u200b", "\u200d\u2060", "\ufeff", " \u2060 "])
@pytest.mark.parametrize("field", ["given_name", "family_name"])
def test_an_invisible_name_is_refused_at_the_boundary(name, field):
    body = {"site_id": "columbus-east", "given_name": "Ana", "family_name": "Baker", "birth_date": "1990-01-01"}
    with pytest.raises(ValidationError) as caught:
        PatientIn.model_validate({**body, field: name})
    assert caught.value.errors()[0]["loc"] == (field,)
    with pytest.raises(ValidationError):
        PatientChange.model_validate({field: name})

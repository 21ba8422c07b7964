"""What every service's api.py builds on: the base model of request bodies."""

from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator


def _holds_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_holds_nul(k) or _holds_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple | set | frozenset):
        return any(_holds_nul(item) for item in value)
    return False


class Input(BaseModel):
    """A request body: unknown fields refused, text stripped, and no NUL character
    anywhere (a list of strings included): PostgreSQL text cannot hold U+0000, so the
    insert would fail with a 500, and no input needs it."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @field_validator("*", mode="after")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        if _holds_nul(value):
            raise ValueError("may not contain the NUL character")
        return value

"""`http.console`: the admin console's users and sessions (dicom_node.ops.console)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from dicom_node.config.base import _Model
from dicom_node.passwords import parse_hash

USER_NAME_MAX = 64  # characters of a console user's name


class ConsoleUser(_Model):
    """A person who may log in to the console; `password_hash` is what `dicom-node hash-password` prints."""

    name: str = Field(min_length=1, max_length=USER_NAME_MAX, pattern=r"^[A-Za-z0-9._@-]+$")
    password_hash: str

    @field_validator("password_hash")
    @classmethod
    def _a_hash(cls, value: str) -> str:
        parse_hash(value)
        return value


class ConsoleConfig(_Model):
    """Without users nobody logs in, and the console's pages answer only bearer-token clients (or, with
    `read_only_without_login` on a loopback API, anyone on this machine, read-only)."""

    users: list[ConsoleUser] = []
    session_hours: float = Field(8, gt=0, le=24 * 30)
    # Past this many failed logins for one user name from one host within lockout_minutes, that name is
    # refused from that host (429) until the oldest failure is lockout_minutes old.
    failed_logins: int = Field(5, ge=1, le=1000)
    lockout_minutes: float = Field(15, gt=0, le=24 * 60)
    read_only_without_login: bool = False

    @model_validator(mode="after")
    def _names_apart(self) -> ConsoleConfig:
        names = [user.name for user in self.users]
        if len(set(names)) != len(names):
            raise ValueError("two console users share a name")
        return self

"""The `destinations` section: DIMSE (C-STORE) and DICOMweb (STOW-RS) destinations, told apart by
`kind`, with the retry policy every kind's exports follow."""

from __future__ import annotations

import base64
import random
import ssl
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, Discriminator, Field, SecretStr, Tag, field_validator, model_validator

from dicom_node import tls
from dicom_node.config.base import LOOPBACK_HOSTS, _Model, _TlsFiles


class RetryPolicy(_Model):
    """When a destination's transient failure is tried again, and when it is given up: the one policy every
    destination kind's exports follow (dicom_node.dispatch.exports asks it; a kind only says transient or permanent).

    Exponential backoff with jitter, so that the exports a PACS outage left pending do not all come back at
    the same second when it returns; capped, so a long outage is still noticed within `max_delay_s`.
    """

    initial_delay_s: float = Field(5, gt=0)
    max_delay_s: float = Field(600, gt=0)
    multiplier: float = Field(2.0, ge=1)
    jitter: float = Field(0.2, ge=0, le=1)
    max_attempts: int = Field(50, ge=1)

    def is_exhausted(self, attempts: int) -> bool:
        """After `attempts` tries, none is left: the export is dead-lettered."""
        return attempts >= self.max_attempts

    def next_delay_s(self, attempts: int, rng: random.Random) -> float:
        """Seconds to wait after the `attempts`-th try failed: initial_delay_s after the first, times
        multiplier after each further one, +-jitter, never over max_delay_s."""
        base = min(self.initial_delay_s * self.multiplier ** max(attempts - 1, 0), self.max_delay_s)
        return min(base * (1 + self.jitter * (2 * rng.random() - 1)), self.max_delay_s)


class DestinationTlsConfig(_TlsFiles):
    """Associations to this destination over TLS (dicom_node.tls)."""

    ca_certificates: Path | None = None  # None: the system's trust store
    certificate: Path | None = None  # ours, for destinations that authenticate their callers
    private_key: Path | None = None
    check_hostname: bool = False

    @model_validator(mode="before")
    @classmethod
    def _certificate_with_key(cls, values: Any) -> Any:
        if isinstance(values, dict) and (values.get("certificate") is None) != (values.get("private_key") is None):
            raise ValueError("certificate and private_key go together")
        return values

    def contexts(self) -> list[ssl.SSLContext]:
        return [tls.client_context(self.ca_certificates, self.certificate, self.private_key, self.check_hostname)]


class DestinationConfig(_Model):
    """A DIMSE destination (`kind: dimse`, the default): C-STORE to an AE (dicom_node.dispatch.dimse)."""

    kind: Literal["dimse"] = "dimse"
    ae_title: str = Field(min_length=1, max_length=16)
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = Field(None, min_length=1, max_length=16)
    timeout_s: float = Field(30, gt=0)
    max_pdu: int = Field(0, ge=0)
    transfer_syntaxes: list[str] = []  # UIDs; empty = explicit + implicit VR little endian
    retry: RetryPolicy = RetryPolicy()
    tls: DestinationTlsConfig | None = None


class BasicAuth(_Model):
    """HTTP basic authentication (RFC 7617). The password is a SecretStr: printed, it is `**********`."""

    type: Literal["basic"]
    username: str = Field(min_length=1)
    password: SecretStr

    @field_validator("username")
    @classmethod
    def _no_colon(cls, value: str) -> str:
        if ":" in value:
            raise ValueError("a basic-auth username cannot contain ':' (RFC 7617 2)")
        return value

    def header(self) -> str:
        pair = f"{self.username}:{self.password.get_secret_value()}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


class BearerAuth(_Model):
    """An OAuth 2.0 bearer token (RFC 6750), as the cloud archives take; a SecretStr, never printed."""

    type: Literal["bearer"]
    token: SecretStr

    @field_validator("token")
    @classmethod
    def _not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("the bearer token is empty")
        return value

    def header(self) -> str:
        return f"Bearer {self.token.get_secret_value()}"


def _auth_form(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return f"={value.type}"
    return f"={value['type']}" if isinstance(value, dict) and value.get("type") in ("basic", "bearer") else None


DicomwebAuth = Annotated[
    Annotated[BasicAuth, Tag("=basic")] | Annotated[BearerAuth, Tag("=bearer")],
    Discriminator(_auth_form, custom_error_type="dicomweb_auth",
                  custom_error_message="auth is {type: basic, username: ..., password: ...} or "
                                       "{type: bearer, token: ...} (leave auth out for none)"),
]


class DicomwebTlsConfig(DestinationTlsConfig):
    """HTTPS to a DICOMweb destination: its certificate must chain to `ca_certificates` (default: the
    system's trust store) and, unlike a DICOM peer, name the URL's host; `certificate` and `private_key`
    are ours, for servers that authenticate clients by certificate (mutual TLS)."""

    check_hostname: bool = True


class DicomwebDestinationConfig(_Model):
    """A DICOMweb destination (`kind: dicomweb`): STOW-RS (PS3.18 10.5) to `url`, the service's base URL
    (studies are stored under {url}/studies/{StudyInstanceUID}), `batch_size` instances a request."""

    kind: Literal["dicomweb"]
    url: str
    auth: DicomwebAuth | None = None
    tls: DicomwebTlsConfig | None = None
    batch_size: int = Field(50, ge=1, le=10_000)
    timeout_s: float = Field(30, gt=0)
    retry: RetryPolicy = RetryPolicy()

    @property
    def calling_ae_title(self) -> None:
        """STOW-RS has no AE titles; the export loop asks every kind for one."""
        return None

    @field_validator("url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.username is not None or parts.password is not None:
            raise ValueError("credentials do not belong in the URL (they would be logged): use auth")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        if parts.query or parts.fragment:
            raise ValueError("the base URL takes no query or fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _secure(self) -> DicomwebDestinationConfig:
        parts = urlsplit(self.url)
        if self.tls is not None and parts.scheme != "https":
            raise ValueError("tls is set but the url is not https://")
        if self.auth is not None and parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
            raise ValueError(f"{self.auth.type} auth over plain http to {parts.hostname} would send the "
                             "credentials in clear text: use an https:// url")
        return self


def _destination_kind(value: Any) -> str | None:
    """Which kind of destination a config entry is (by its `kind`, default dimse), so that errors are
    about the kind the admin meant, not about every kind."""
    if isinstance(value, BaseModel):
        kind = value.kind
    else:
        kind = value.get("kind", "dimse") if isinstance(value, dict) else None
    return f"={kind}" if kind in DESTINATION_KINDS else None


# The kinds registered in dicom_node.dispatch.registry.KINDS (a test keeps the two lists the same).
DESTINATION_KINDS = {"dimse": DestinationConfig, "dicomweb": DicomwebDestinationConfig}

AnyDestination = Annotated[
    Annotated[DestinationConfig, Tag("=dimse")] | Annotated[DicomwebDestinationConfig, Tag("=dicomweb")],
    Discriminator(_destination_kind, custom_error_type="destination_kind",
                  custom_error_message=f"kind is one of {', '.join(DESTINATION_KINDS)} (default dimse)"),
]

"""What every config model shares: unknown keys refused, relative paths anchored at the config file's
folder, and TLS file sets checked when the file is loaded."""

from __future__ import annotations

import ssl
from abc import abstractmethod
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator, model_validator

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _resolve(path: Path, info: ValidationInfo) -> Path:
    """Anchor a relative path at the config file's folder (passed as validation context)."""
    base = (info.context or {}).get("base_dir")
    return path if path.is_absolute() or base is None else Path(base) / path


class _TlsFiles(_Model):
    """TLS settings: every path (certificate, key, CA file) is anchored at the config file's folder, and
    the contexts they make are built once at load, so a bad file is a located config error."""

    @field_validator("*")
    @classmethod
    def _anchor(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve(value, info) if isinstance(value, Path) else value

    @abstractmethod
    def contexts(self) -> list[ssl.SSLContext]:
        """The SSL contexts these settings are for (each subclass names its own)."""

    @model_validator(mode="after")
    def _usable(self) -> _TlsFiles:
        try:
            self.contexts()
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"TLS certificate, key or CA file unusable: {error}") from None
        return self

"""The `inference` section: which backend runs the models (embedded ONNX Runtime or Triton) and how."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from dicom_node.config.base import _Model, _resolve

DEFAULT_TRITON_URL = "127.0.0.1:8001"


class TritonConfig(_Model):
    """One Triton (KServe v2) server (`url`) or a pool of servers serving the same repository (`urls`):
    requests go round-robin to the servers that are up; one that fails with a connection error or
    reports not ready is left out for `backoff_s` (doubling while its readiness probe fails) and the
    request goes to the next (inference.server_pool)."""

    url: str | None = None
    urls: list[str] = []
    protocol: Literal["grpc", "http"] = "grpc"
    timeout_s: float = Field(60, gt=0)
    retries: int = Field(3, ge=0)
    backoff_s: float = Field(5, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _one_form(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("url") is not None and values.get("urls"):
            raise ValueError("give url (one server) or urls (a pool), not both")
        return values

    @field_validator("urls")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        repeated = sorted({url for url in value if value.count(url) > 1})
        if repeated:
            raise ValueError(f"urls lists {', '.join(repeated)} more than once")
        return value

    @property
    def servers(self) -> tuple[str, ...]:
        return tuple(self.urls) or (self.url or DEFAULT_TRITON_URL,)


class EmbeddedConfig(_Model):
    cpu_threads: int = Field(0, ge=0)  # 0 = ONNX Runtime default
    providers: list[str] = []  # empty = CUDA if present else CPU


class PrepareConfig(_Model):
    """Decode while receiving (dicom_node.pipeline.prepare): how much decoded pixel data the node keeps."""

    max_mb: float = Field(1024, ge=0)  # 0 turns it off: jobs decode every instance from the spool
    max_series: int = Field(4, ge=1)


class InferenceConfig(_Model):
    backend: Literal["embedded", "triton"] = "embedded"
    model_repository: Path = Path("models")
    triton: TritonConfig = TritonConfig()
    embedded: EmbeddedConfig = EmbeddedConfig()
    workers: int = Field(1, ge=1)
    prepare: PrepareConfig = PrepareConfig()

    @field_validator("model_repository")
    @classmethod
    def _anchor_model_repository(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)

    def backend_settings(self):
        """The inference package's settings for the backend this config selects (its only way in)."""
        from inference.backends import BackendSettings
        return BackendSettings(
            kind=self.backend, urls=self.triton.servers, protocol=self.triton.protocol,
            timeout_s=self.triton.timeout_s, retries=self.triton.retries, backoff_s=self.triton.backoff_s,
            cpu_threads=self.embedded.cpu_threads, providers=list(self.embedded.providers),
        )

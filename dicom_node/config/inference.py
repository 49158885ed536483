"""The `inference` section: which backend runs the models (embedded ONNX Runtime or Triton) and how."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from dicom_node.config.base import _Model, _resolve


class TritonConfig(_Model):
    url: str = "127.0.0.1:8001"
    protocol: Literal["grpc", "http"] = "grpc"
    timeout_s: float = Field(60, gt=0)
    retries: int = Field(3, ge=0)


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
            kind=self.backend, url=self.triton.url, protocol=self.triton.protocol,
            timeout_s=self.triton.timeout_s, retries=self.triton.retries,
            cpu_threads=self.embedded.cpu_threads, providers=list(self.embedded.providers),
        )

"""The `results` section: how the node writes its result series (UIDs, series numbers, SEG options)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from dicom_node.config.base import _Model


class ResultsConfig(_Model):
    org_root: str | None = Field(None, pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=40)
    manufacturer: str = "dicom-node"
    # Each output kind's SeriesNumber for the first pipeline's first generation; the others are derived
    # from them (dicom_node.results.series_number), so they must differ and lie within one decade.
    seg_series_number: int = Field(9901, ge=1, le=1_000_000)
    sr_series_number: int = Field(9902, ge=1, le=1_000_000)
    overlay_series_number: int = Field(9903, ge=1, le=1_000_000)
    keyimage_series_number: int = Field(9904, ge=1, le=1_000_000)
    series_description_prefix: str = "AI"
    seg_omit_empty_frames: bool = False
    empty_segmentation: Literal["write", "skip"] = "write"
    # Uncompressed by default: a 1-bit JPEG 2000 SEG is valid DICOM, but GDCM and dcmtk (and the
    # PACS and viewers built on them) cannot decode it, while a BINARY frame is only 32 KiB.
    compress_frames: bool = False

    @model_validator(mode="after")
    def _series_numbers_apart(self) -> ResultsConfig:
        numbers = (self.seg_series_number, self.sr_series_number, self.overlay_series_number,
                   self.keyimage_series_number)
        if len(set(numbers)) != len(numbers) or max(numbers) - min(numbers) >= 10:
            raise ValueError("the *_series_number settings must differ and lie within 10 of each other (each "
                             "pipeline adds 10, each generation 1000)")
        return self

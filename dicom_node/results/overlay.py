"""Mask outlines burned into the CT as an RGB Secondary Capture series, for PACS that cannot show SEG.

Secondary Capture Image Storage (1.2.840.10008.5.1.4.1.1.7, PS3.3 A.8.1) is
the one image object every PACS and viewer displays; CT Image Storage cannot
carry colour (PS3.3 C.8.2.1: MONOCHROME only). One instance per source slice,
in the source study, a new series: the CT in a soft-tissue window (W 400 /
L 40 by default) with each segment's boundary in its own colour.
BurnedInAnnotation is YES (PS3.3 C.7.6.1.1.3) because the outline is in the
pixels, and each instance references its source slice (Source Image Sequence)
so a viewer can link the two.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless

from dicom_node.results import OutputSeries, save_dataset, source_headers
from dicom_node.results.seg import check_source_grid
from inference.results import LabelMap
from inference.volume import Volume

if TYPE_CHECKING:
    from dicom_node.config.results import ResultsConfig

OVERLAY_KIND = "overlay"
# Distinct, saturated colours that stay visible on grey CT; segment n gets colour n-1 (cycling).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 40, 40), (40, 220, 40), (60, 120, 255), (255, 220, 0), (255, 0, 255), (0, 230, 230),
    (255, 140, 0), (160, 90, 255),
)


@dataclass(frozen=True)
class OverlayOptions:
    series: OutputSeries
    window_center: float = 40.0
    window_width: float = 400.0
    compress: bool = True  # RLE Lossless (PS3.5 G), which every PACS we met decodes

    @classmethod
    def from_config(cls, results: ResultsConfig, series: OutputSeries) -> OverlayOptions:
        return cls(series=series, compress=results.compress_frames)


def write_overlay(
    label_map: LabelMap,
    sources: Sequence[pydicom.Dataset],
    source_pixels: Volume,
    out_dir: Path,
    options: OverlayOptions,
    frame_numbers: Sequence[int | None] | None = None,
) -> list[Path]:
    """Write one RGB instance per source slice; returns the paths in slice order.

    `source_pixels` is the CT in Hounsfield units on the label map's grid
    (LoadedSeries.volume); `frame_numbers[k]` is the frame of `sources[k]` that
    slice k is, for a multi-frame source (referenced as Referenced Frame Number).
    """
    frame_numbers = list(frame_numbers) if frame_numbers is not None else [None] * len(sources)
    check_source_grid(label_map, sources, frame_numbers)
    if not source_pixels.same_grid(label_map.volume):
        raise ValueError("source_pixels and the label map are not on the same grid")
    headers = source_headers(sources)
    series = options.series
    orientation = hd.spatial.get_closest_patient_orientation(np.asarray(source_pixels.direction))
    colours = {segment.value: PALETTE[index % len(PALETTE)] for index, segment in enumerate(label_map.segments)}
    paths = []
    for k, header in enumerate(headers):
        rgb = outlined(source_pixels.array[k], label_map.volume.array[k], colours, options)
        image = rgb_secondary_capture(
            header, rgb, series, OVERLAY_KIND, k,
            pixel_spacing=(float(source_pixels.spacing[1]), float(source_pixels.spacing[0])),
            patient_orientation=(orientation[0], orientation[1]),
            transfer_syntax_uid=RLELossless if options.compress else ExplicitVRLittleEndian,
            series_description=series.series_description,
            derivation=f"CT W{options.window_width:g}/L{options.window_center:g} with segment outlines",
            source=header, frame_number=frame_numbers[k])
        paths.append(save_dataset(image, out_dir / f"OVERLAY_{k + 1:05d}_{image.SOPInstanceUID}.dcm"))
    return paths


def outlined(hu: np.ndarray, labels: np.ndarray, colours: dict[int, tuple[int, int, int]], options: OverlayOptions) -> np.ndarray:
    """One slice: windowed grey as RGB, boundary pixels of each label painted in its colour."""
    grey = windowed(hu, options.window_center, options.window_width).astype(np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    for value, colour in colours.items():
        rgb[boundary(labels == value)] = colour
    return rgb


def boundary(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside it (the image edge counts as outside)."""
    padded = np.pad(mask, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior


def windowed(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    """Hounsfield units through a window (PS3.3 C.11.2.1.2, linear) as grey 0-255, float32."""
    low = center - width / 2
    return np.clip((hu.astype(np.float32) - low) * (255.0 / width), 0, 255)


def rgb_secondary_capture(ref: Dataset, rgb: np.ndarray, series: OutputSeries, kind: str, index: int, *,
                          pixel_spacing: tuple[float, float], patient_orientation: tuple[str, str],
                          transfer_syntax_uid: str, series_description: str, derivation: str,
                          source: Dataset | None, frame_number: int | None = None) -> hd.sc.SCImage:
    """Instance `index` of `series`' `kind` result series: an RGB Secondary Capture (PS3.3 A.8.1) of
    `rgb`, patient and study from `ref`, with what is burned into its pixels said (BurnedInAnnotation
    YES, PS3.3 C.7.6.1.1.3; Derivation Description), and `source` (frame `frame_number` of it for a
    multi-frame source) referenced in the Source Image Sequence when the image is one of its slices."""
    image = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref,
        pixel_array=rgb,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        series_instance_uid=series.seed.series_uid(kind),
        series_number=series.series_number,
        sop_instance_uid=series.seed.instance_uid(kind, index),
        instance_number=index + 1,
        manufacturer=series.manufacturer,
        pixel_spacing=pixel_spacing,
        patient_orientation=patient_orientation,
        transfer_syntax_uid=transfer_syntax_uid,
        series_description=series_description[:64],
    )
    image.BurnedInAnnotation = "YES"
    # General Series Laterality is 2C (PS3.3 C.7.3.1): the source's, or empty (unknown / unpaired).
    image.Laterality = ref.get("Laterality", "")
    image.ImageType = ["DERIVED", "SECONDARY"]
    image.DerivationDescription = derivation
    if source is not None:
        reference = Dataset()
        reference.ReferencedSOPClassUID = source.SOPClassUID
        reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
        if frame_number is not None:
            reference.ReferencedFrameNumber = frame_number
        image.SourceImageSequence = [reference]
    # SC Equipment (PS3.3 C.8.6.1): the node is the capture device.
    image.SecondaryCaptureDeviceManufacturer = series.manufacturer[:64]
    image.SecondaryCaptureDeviceManufacturerModelName = series.manufacturer_model_name[:64]
    image.SecondaryCaptureDeviceSoftwareVersions = series.software_versions[:64]
    return image

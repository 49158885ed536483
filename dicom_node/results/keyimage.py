"""Lung involvement key images: one axial and one coronal RGB Secondary Capture, lungs and opacities coloured.

For a reader who opens the study without a SEG-capable viewer: the axial slice
and the coronal plane holding the most opacity (else the lungs' middle), in
a lung window (W 1500 / L -600), lung outlines in blue, ground-glass tinted
yellow, consolidation red. Secondary Capture Image Storage (PS3.3 A.8.1),
BurnedInAnnotation YES (PS3.3 C.7.6.1.1.3); the axial image references its
source slice. The coronal plane is a reformat of the series (Derivation
Description says so), its rows running head to feet with the slice spacing as
row spacing (PS3.3 C.8.6.2 Pixel Spacing).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.results import OutputSeries, save_dataset, source_headers
from dicom_node.results.overlay import boundary, rgb_secondary_capture, windowed
from inference.involvement import CONSOLIDATION, GROUND_GLASS, LungInvolvement
from inference.results import LabelMap
from inference.volume import Volume

KEY_IMAGE_KIND = "keyimage"
LUNG_OUTLINE = (60, 140, 255)
TINTS = {GROUND_GLASS.value: (255, 220, 0), CONSOLIDATION.value: (255, 40, 40)}


@dataclass(frozen=True)
class KeyImageOptions:
    series: OutputSeries
    window_center: float = -600.0
    window_width: float = 1500.0
    tint: float = 0.45  # weight of a tint colour over the grey


def write_key_images(result: LungInvolvement, lungs: LabelMap, pixels: Volume, sources: Sequence[pydicom.Dataset],
                     out_dir: Path, options: KeyImageOptions) -> list[Path]:
    """Write the axial and the coronal key image; returns their paths (none without lungs)."""
    lung_labels = np.asarray(lungs.volume.array)
    opacity = np.asarray(result.opacities.volume.array)
    if not lung_labels.any():
        return []
    headers = source_headers(sources)
    weight = opacity > 0 if opacity.any() else lung_labels > 0
    k = int(np.argmax(weight.sum(axis=(1, 2))))
    j = int(np.argmax(weight.sum(axis=(0, 2))))
    superior_first = np.asarray(pixels.direction)[2, 2] < 0  # slice order on screen: head at the top
    order = slice(None) if superior_first else slice(None, None, -1)
    planes = [
        ("axial", _paint(pixels.array[k], lung_labels[k], opacity[k], options), headers[k],
         (float(pixels.spacing[1]), float(pixels.spacing[0])), hd.spatial.get_closest_patient_orientation(
             np.asarray(pixels.direction))[:2]),
        ("coronal", _paint(pixels.array[order, j], lung_labels[order, j], opacity[order, j], options), None,
         (float(pixels.spacing[2]), float(pixels.spacing[0])), (_letter(np.asarray(pixels.direction)[:, 0]), "F")),
    ]
    paths = []
    for index, (plane, rgb, source, spacing, orientation) in enumerate(planes):
        series = options.series
        image = rgb_secondary_capture(
            headers[0], rgb, series, KEY_IMAGE_KIND, index, pixel_spacing=spacing,
            patient_orientation=tuple(str(getattr(o, "value", o)) for o in orientation),
            transfer_syntax_uid=ExplicitVRLittleEndian,
            series_description=f"{series.series_description} lung involvement",
            derivation=(f"{plane} {'slice' if source is not None else 'reformat'}, CT W{options.window_width:g}/"
                        f"L{options.window_center:g}; lungs blue, ground-glass yellow, consolidation red; "
                        "quantification, not a diagnosis")[:1024],
            source=source)
        paths.append(save_dataset(image, out_dir / f"KEY_{plane}_{image.SOPInstanceUID}.dcm"))
    return paths


def _letter(vector: np.ndarray) -> str:
    """The patient direction (PS3.3 C.7.6.1.1.1) an image row runs along, from the LPS x of the i axis."""
    return "L" if vector[0] > 0 else "R"


def _paint(hu: np.ndarray, lungs: np.ndarray, opacity: np.ndarray, options: KeyImageOptions) -> np.ndarray:
    grey = windowed(hu, options.window_center, options.window_width)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    for value, colour in TINTS.items():
        where = opacity == value
        rgb[where] = (1 - options.tint) * rgb[where] + options.tint * np.asarray(colour, dtype=np.float32)
    rgb = rgb.astype(np.uint8)
    for value in np.unique(lungs[lungs > 0]):
        rgb[boundary(lungs == value)] = LUNG_OUTLINE
    return np.ascontiguousarray(rgb)

"""Result previews: a job's SEG drawn on its source CT, in three planes through the segmented organ's centre.

A radiologist checks a result at a glance: is the mask on the organ, does it
follow its edge, is it on the right side. So each plane shows the CT in a
window (soft tissue W400/L40, or lung W1500/L-600 for a lung result), every
segment filled in a semi-transparent colour and outlined in full colour (a
pixel of the mask with a 4-neighbour outside it), and the axial, coronal and
sagittal planes go through the centre of mass of all segments. Coronal and
sagittal planes are stretched along the slice axis by slice spacing / pixel
spacing, with the head end up (the LPS +z end), as a viewer shows them.

For a pipeline with a lung involvement step, the lungs can be drawn by the
HU band of each voxel instead (emphysema, ground-glass, consolidation; normally
aerated parenchyma left grey) with the step's own band limits
(`inference.involvement`), which is how its percentages were measured.

The source series is read from the spool with the pipeline's own loader, and
the SEG from the job's folder with `dicom_node.results.segread`, on that grid:
what is drawn is what was sent to the PACS. One result stays loaded (the
three planes of a page are three requests).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WINDOWS = {"soft": ("soft tissue", 40.0, 400.0), "lung": ("lung", -600.0, 1500.0)}  # name, level, width (HU)
PLANES = ("axial", "coronal", "sagittal")
SEGMENT_COLOURS = ((255, 64, 0), (0, 170, 255), (255, 215, 0), (190, 70, 255), (0, 220, 110), (255, 0, 160))
BAND_COLOURS = {"emphysema": (40, 110, 255), "ground_glass": (255, 200, 0), "consolidation": (255, 30, 30)}
FILL_ALPHA = 0.35
LUNG_LABELS = ("Right lung", "Left lung")  # inference.lung's segment labels


@dataclass(frozen=True)
class SegmentView:
    number: int
    label: str
    colour: tuple[int, int, int]
    voxels: int


@dataclass(frozen=True, eq=False)
class JobResult:
    """A job's SEG on its source CT, loaded once for the previews of its page."""

    seg_path: Path
    hu: np.ndarray  # (k, j, i), Hounsfield units
    spacing: tuple[float, float, float]  # i, j, k (mm)
    masks: dict[int, np.ndarray]  # segment number -> (k, j, i) bool
    segments: tuple[SegmentView, ...]
    centre: tuple[int, int, int]  # k, j, i
    slice_positions: tuple[float, ...]  # each k's Image Position (Patient) z (mm)
    source_uids: tuple[str, ...]  # each k's SOP Instance UID
    bands: object | None  # InvolvementParameters of the pipeline's lung involvement step, None without one

    @property
    def lung(self) -> bool:
        return any(segment.label in LUNG_LABELS for segment in self.segments)


class PreviewError(Exception):
    """The job has no SEG to preview, or its source series is gone (retention) or unreadable."""


def find_seg(output_dir: str | None) -> Path | None:
    """The SEG the job wrote in its folder (one a job), None without one."""
    if not output_dir or not Path(output_dir).is_dir():
        return None
    import pydicom
    for path in sorted(Path(output_dir).glob("*.dcm")):
        try:
            if pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).get("Modality") == "SEG":
                return path
        except Exception:
            continue
    return None


def legend(seg_path: Path) -> list[tuple[str, str]]:
    """(segment label, CSS colour) of each segment of the SEG, in the colours its previews draw them."""
    import pydicom
    segments = pydicom.dcmread(seg_path, stop_before_pixels=True).get("SegmentSequence", [])
    numbered = sorted((int(item.SegmentNumber), str(item.get("SegmentLabel", ""))) for item in segments)
    return [(label, "#%02x%02x%02x" % SEGMENT_COLOURS[index % len(SEGMENT_COLOURS)])
            for index, (_, label) in enumerate(numbered)]


def load_result(seg_path: Path, instance_paths: list[Path], bands: object | None) -> JobResult:
    """Read the source series and the SEG on its grid (PreviewError when either cannot be read)."""
    import pydicom

    from dicom_node.pipeline.volume import load_series
    from dicom_node.results.segread import read_seg

    missing = [path for path in instance_paths if not path.exists()]
    if not instance_paths or missing:
        raise PreviewError(f"the source series is no longer in the spool ({len(missing)} of {len(instance_paths)} "
                           "files missing: deleted by retention?)")
    try:
        loaded = load_series(instance_paths)
        headers = {path: pydicom.dcmread(path, stop_before_pixels=True)
                   for path in dict.fromkeys(s.path for s in loaded.slices)}
        sources = [headers[s.path] for s in loaded.slices]
        seg = read_seg(seg_path, sources)
    except Exception as error:
        raise PreviewError(f"{seg_path.name} or its source series cannot be read: {error}") from error
    masks = {number: volume.array > 0.5 for number, volume in seg.masks.items()}
    segments = tuple(SegmentView(number, seg.segments[number].label,
                                 SEGMENT_COLOURS[index % len(SEGMENT_COLOURS)], int(masks[number].sum()))
                     for index, number in enumerate(sorted(masks)))
    union = np.zeros(loaded.volume.shape, dtype=bool)
    for mask in masks.values():
        union |= mask
    centre = tuple(int(round(float(c))) for c in np.argwhere(union).mean(axis=0)) if union.any() \
        else tuple(n // 2 for n in union.shape)
    positions = tuple(float(s.ImagePositionPatient[2]) if "ImagePositionPatient" in s else float(k)
                      for k, s in enumerate(sources))
    return JobResult(seg_path, loaded.volume.array, tuple(loaded.volume.spacing), masks, segments, centre,  # type: ignore[arg-type]
                     positions, tuple(str(s.SOPInstanceUID) for s in sources), bands)


def _plane(volume: np.ndarray, plane: str, centre: tuple[int, int, int]) -> np.ndarray:
    """The 2-D cut of a (k, j, i) array: axial (j, i), coronal (k, i), sagittal (k, j); k flipped so the
    head end is up."""
    k, j, i = centre
    if plane == "axial":
        return volume[k]
    cut = volume[:, j, :] if plane == "coronal" else volume[:, :, i]
    return cut[::-1]


def _stretch(image: np.ndarray, plane: str, spacing: tuple[float, float, float]) -> np.ndarray:
    """Nearest-neighbour rows so a coronal or sagittal pixel is as tall as it is wide in mm."""
    if plane == "axial":
        return image
    factor = spacing[2] / (spacing[0] if plane == "coronal" else spacing[1])
    rows = max(1, int(round(image.shape[0] * factor)))
    return image[np.minimum((np.arange(rows) / factor).astype(int), image.shape[0] - 1)]


def _outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of `mask` with a 4-neighbour outside it (the image border counts as outside)."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def render(result: JobResult, plane: str, window: str, bands: bool = False) -> np.ndarray:
    """The (height, width, 3) uint8 preview of one plane (module docstring)."""
    if plane not in PLANES or window not in WINDOWS:
        raise ValueError(f"plane is one of {PLANES}, window one of {tuple(WINDOWS)}")
    _, level, width = WINDOWS[window]
    hu = _stretch(_plane(result.hu, plane, result.centre), plane, result.spacing).astype(np.float32)
    grey = np.clip((hu - (level - width / 2)) / width * 255.0, 0, 255)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    band_index = None
    if bands and result.bands is not None:
        from inference.involvement import BANDS, band_index
        band_index = band_index(hu, result.bands)
    for segment in result.segments:
        mask = _stretch(_plane(result.masks[segment.number], plane, result.centre), plane, result.spacing)
        colour = np.array(segment.colour, dtype=np.float32)
        if band_index is not None and segment.label in LUNG_LABELS:
            for index, band in enumerate(BANDS):
                if band in BAND_COLOURS:
                    where = mask & (band_index == index)
                    rgb[where] = rgb[where] * (1 - 2 * FILL_ALPHA) + np.array(BAND_COLOURS[band]) * 2 * FILL_ALPHA
        else:
            rgb[mask] = rgb[mask] * (1 - FILL_ALPHA) + colour * FILL_ALPHA
        rgb[_outline(mask)] = colour
    return np.round(rgb).astype(np.uint8)


class ResultCache:
    """The last result loaded, by SEG path and modification time (a retried job writes a new SEG)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._result: JobResult | None = None

    def get(self, seg_path: Path, instance_paths: list[Path], bands: object | None) -> JobResult:
        key = (str(seg_path), seg_path.stat().st_mtime_ns, len(instance_paths))
        with self._lock:
            if self._key != key:
                self._result, self._key = None, None
                self._result = load_result(seg_path, instance_paths, bands)
                self._key = key
            return self._result

"""DICOM series -> geometry-checked `inference.Volume`: from a completed series to a trustworthy volume.

`SeriesSummary` is the routing data: what `route` matches pipeline rules on.
`load_series` turns the instances of one series into a volume a model can use,
or refuses with a `SeriesGeometryError` that names the series and the
instances at fault. `SeriesHeaders` reads the headers once for routing: its
summary, and every check that needs no pixel, so routing can refuse a series
before a job exists; the checks themselves are `dicom_node.pipeline.checks`'s.
Slices are ordered by Image Position (Patient) projected on the slice normal
(PS3.3 C.7.6.2.1.1), never by Instance Number, which scanners number in acquisition order, not space.

Memory: the output array is allocated once and filled one frame at a time
(read the file, decode that frame, rescale it into place), so one copy of the
volume exists. It is int16 when every Rescale Slope/Intercept is integral and
the stored bit depth maps into int16 (the usual CT case, half the memory of
float32), float32 otherwise; values are in Rescale Type units (HU for CT).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.pixels import iter_pixels
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_node.pipeline.checks import AXIS_COSINE, ORIENTATION_TOLERANCE, VolumeOptions, check_headers, position_text
from dicom_node.pipeline.frames import Frame, Headers, SeriesGeometryError, SourceSlice, read_headers
from dicom_node.pipeline.prepare import PreparedStore
from inference.volume import Volume

__all__ = ["LoadedSeries", "SeriesGeometryError", "SeriesHeaders", "SeriesSummary", "SourceSlice", "check_series",
           "load_series", "summarize_series"]


@dataclass(frozen=True)
class SeriesSummary:
    """The attributes of a series that routing rules match on (all from the DICOM headers).

    `orientation` is derived from Image Orientation (Patient): "axial",
    "coronal", "sagittal", "oblique", or "mixed" when instances disagree.
    Every attribute but the two counts describes the series' images: an
    instance without pixel data (an SR, KOS, presentation state, encapsulated
    document, RT structure set or plan, waveform) is counted apart and never
    reaches a volume.
    """

    study_instance_uid: str
    series_instance_uid: str
    modality: str
    body_part_examined: str
    series_description: str
    image_type: tuple[str, ...]
    slice_thickness: float | None
    number_of_slices: int
    manufacturer: str
    contrast_agent: str | None
    orientation: str
    image_instances: int  # instances with pixel data: none makes a non-image series (SR, KOS, PDF...)
    non_image_sop_classes: tuple[str, ...]  # SOP Class UIDs of the series' other instances, never in a volume


@dataclass(frozen=True, eq=False)
class LoadedSeries:
    """A checked volume, `slices[k]` being the source of `volume.array[k]`.

    `summary` describes the frames that made the volume (localizers and
    dropped duplicates excluded), `warnings` says what was excluded and why.
    """

    volume: Volume
    slices: tuple[SourceSlice, ...]
    summary: SeriesSummary
    warnings: tuple[str, ...]
    prepared_frames: int = 0  # frames whose pixels were decoded while the series arrived (pipeline.prepare)


def _orientation_name(orientations: Sequence[np.ndarray]) -> str:
    if not orientations:
        return "unknown"
    if any(not np.allclose(o, orientations[0], atol=ORIENTATION_TOLERANCE) for o in orientations):
        return "mixed"
    normal = np.abs(np.cross(orientations[0][:3], orientations[0][3:]))
    axis = int(np.argmax(normal))
    return ("sagittal", "coronal", "axial")[axis] if normal[axis] >= AXIS_COSINE else "oblique"


def _contrast_agent(ds: Dataset) -> str | None:
    """Contrast/Bolus Agent (PS3.3 C.7.6.4), or the Enhanced Contrast/Bolus agent code's meaning."""
    agent = str(ds.get("ContrastBolusAgent") or "").strip()
    if not agent and ds.get("ContrastBolusAgentSequence"):
        agent = str(ds.ContrastBolusAgentSequence[0].get("CodeMeaning") or "").strip()
    return agent or None


def _summary(headers: Headers, frames: Sequence[Frame]) -> SeriesSummary:
    ds = headers.first
    thicknesses = [f.slice_thickness for f in frames if f.slice_thickness is not None]
    return SeriesSummary(
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        modality=str(ds.get("Modality", "")),
        body_part_examined=str(ds.get("BodyPartExamined", "")),
        series_description=str(ds.get("SeriesDescription", "")),
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
        slice_thickness=thicknesses[0] if thicknesses else None,
        number_of_slices=len(frames),
        manufacturer=str(ds.get("Manufacturer", "")),
        contrast_agent=_contrast_agent(ds),
        orientation=_orientation_name([f.orientation for f in frames if f.orientation is not None]),
        image_instances=headers.image_instances,
        non_image_sop_classes=tuple(headers.non_image_sop_classes),
    )


@dataclass(frozen=True, eq=False)
class SeriesHeaders:
    """The headers of one series, read once (no pixel): what routing summarizes, then checks."""

    headers: Headers

    @classmethod
    def read(cls, paths: Iterable[Path]) -> SeriesHeaders:
        return cls(read_headers(paths))

    def summary(self) -> SeriesSummary:
        """Routing data: image frames, localizers excluded, are the slices counted."""
        images = [f for f in self.headers.frames
                  if f.position is not None and f.orientation is not None and not f.localizer]
        return _summary(self.headers, images)

    def check(self, options: VolumeOptions = VolumeOptions()) -> tuple[str, ...]:
        """Raise `SeriesGeometryError` for a series `load_series` would refuse on its headers alone;
        returns the warnings (what would be excluded).

        Routing calls this before it creates a job, so a series no model can
        use is quarantined with the reason without a worker, a decoded pixel
        or a second of inference spent on it. What only pixels show
        (conflicting duplicates, undecodable frames) is left to `load_series`.
        """
        return tuple(check_headers(self.headers.first, self.headers.frames, options).check.warnings)


def summarize_series(paths: Iterable[Path]) -> SeriesSummary:
    """`SeriesHeaders.summary` of the instances at `paths`."""
    return SeriesHeaders.read(paths).summary()


def _output_dtype(frames: Sequence[Frame], resample: bool) -> np.dtype:
    """int16 when integral rescaling maps every storable value into int16 (PS3.3 C.11.1.1.2), else float32."""
    if resample:
        return np.dtype(np.float32)
    info = np.iinfo(np.int16)
    for f in frames:
        if f.slope != int(f.slope) or f.intercept != int(f.intercept):
            return np.dtype(np.float32)
        ends = [f.slope * v + f.intercept for v in f.stored_range]
        if min(ends) < info.min or max(ends) > info.max:
            return np.dtype(np.float32)
    return np.dtype(np.int16)


def _fill(out: np.ndarray, frame: Frame, pixels: np.ndarray) -> None:
    """Rescale one decoded frame into its slice of the output, in place."""
    out[...] = pixels
    if frame.slope != 1:
        out *= out.dtype.type(frame.slope)
    if frame.intercept != 0:
        out += out.dtype.type(frame.intercept)


def _shift_in_plane(image: np.ndarray, shift_ij: tuple[float, float], pad: float) -> np.ndarray:
    """`image` moved by `shift_ij` pixels (i = columns, j = rows), linear interpolation (SimpleITK)."""
    source = sitk.GetImageFromArray(image)
    transform = sitk.TranslationTransform(2, (-shift_ij[0], -shift_ij[1]))
    return sitk.GetArrayFromImage(sitk.Resample(source, source, transform, sitk.sitkLinear, pad))


def _by_file(frames: Iterable[Frame]) -> dict[Path, list[Frame]]:
    files: dict[Path, list[Frame]] = defaultdict(list)
    for frame in frames:
        files[frame.source.path].append(frame)
    return files


def _decoded(files: dict[Path, list[Frame]], prepared: PreparedStore | None,
             used: list[int]) -> Iterator[tuple[Frame, np.ndarray]]:
    """Decode only the wanted frames, one file and one frame at a time (pydicom pixel plugins), or take
    them from what `prepared` holds for the file as it is now (`used[0]` counts those frames).

    Given a path, pydicom reads one frame's bytes at a time, so a multi-frame
    instance never sits in memory whole; a deflated file (PS3.5 A.5) must be
    inflated whole first.

    With `prepared`, each file is looked up just before it would be decoded, and the files go from the
    far end of the order the decoder works through (arrival, which senders mostly keep in file order):
    when the job starts before the decoder is done, both decode what is left, and meet in the middle.
    """
    for path in sorted(files, reverse=prepared is not None):
        wanted = sorted(files[path], key=lambda f: f.source.frame_number or 1)
        indices = [(f.source.frame_number or 1) - 1 for f in wanted]
        ready = None if prepared is None else prepared.frames(path, wanted[0].pixel_data.frames, wanted[0].rows,
                                                              wanted[0].columns)
        if ready is not None:
            used[0] += len(wanted)
            for frame, index in zip(wanted, indices):
                yield frame, ready[index]
            continue
        source = pydicom.dcmread(path) if wanted[0].transfer_syntax == DeflatedExplicitVRLittleEndian else path
        try:
            for frame, pixels in zip(wanted, iter_pixels(source, indices=indices)):
                yield frame, pixels
        except Exception as error:  # truncated or corrupt pixel data: the decoder's words, the file named
            raise SeriesGeometryError(wanted[0].series_instance_uid, (wanted[0].uid,),
                                      f"pixel data of {path.name} cannot be decoded: "
                                      f"{type(error).__name__}: {error}") from error


def check_series(paths: Iterable[Path], options: VolumeOptions = VolumeOptions()) -> tuple[str, ...]:
    """`SeriesHeaders.check` of the instances at `paths`."""
    return SeriesHeaders.read(paths).check(options)


def load_series(paths: Iterable[Path], options: VolumeOptions = VolumeOptions(),
                prepared: PreparedStore | None = None) -> LoadedSeries:
    """Read, check and stack one series; raises `SeriesGeometryError` for a series that would give a wrong volume.

    `prepared`: pixels decoded while the series arrived (`dicom_node.pipeline.prepare`), used for each
    instance file they were decoded from, as it is now; every other file is decoded here. The headers
    are read and checked either way.

    Volume axes follow SimpleITK: i along the row direction (Image Orientation
    (Patient)[0:3]), j along the column direction ([3:6]), k along their cross
    product, slices ascending; the origin is the first slice's position.
    """
    headers = read_headers(paths)
    checked = check_headers(headers.first, headers.frames, options)
    check, stack, groups, offsets = checked.check, checked.stack, checked.groups, checked.offsets
    if headers.non_images:
        check.warnings.append(f"excluded {len(headers.non_images)} instance(s) without pixel data (not images): "
                              f"{', '.join(uid for uid, _ in headers.non_images)}")
    resample = bool(np.any(offsets))

    first = groups[0][0]
    row_spacing, column_spacing = first.pixel_spacing
    direction = np.column_stack([first.orientation[:3], first.orientation[3:], first.normal])
    dtype = _output_dtype(stack, resample)
    array = np.empty((len(groups), first.rows, first.columns), dtype=dtype)

    # First the frame that fills each slice, then any duplicates, compared with what they would duplicate.
    slice_of = {frame: k for k, group in enumerate(groups) for frame in group}
    used = [0]
    for frame, pixels in _decoded(_by_file(group[0] for group in groups), prepared, used):
        _fill(array[slice_of[frame]], frame, pixels)
    scratch = np.empty(array.shape[1:], dtype=dtype)
    for frame, pixels in _decoded(_by_file(f for group in groups for f in group[1:]), prepared, used):
        k = slice_of[frame]
        _fill(scratch, frame, pixels)
        if not np.array_equal(scratch, array[k]):
            raise check.fail([groups[k][0], frame], f"duplicate slice position {position_text(frame)}: {groups[k][0].where} "
                                                    f"and {frame.where} hold different pixel values")
    for group in groups:
        if len(group) > 1:
            check.warnings.append(f"duplicate slice position {position_text(group[0])}: dropped identical "
                                  f"{', '.join(f.where for f in group[1:])} (kept {group[0].where})")
    if resample:
        pad = float(array.min())
        for k, offset in enumerate(offsets):
            shift = (float(offset @ direction[:, 0]) / column_spacing, float(offset @ direction[:, 1]) / row_spacing)
            array[k] = _shift_in_plane(array[k], shift, pad)

    kept = [g[0] for g in groups]
    volume = Volume(array=array, spacing=(column_spacing, row_spacing, checked.spacing_k),
                    origin=tuple(float(v) for v in first.position), direction=direction)
    return LoadedSeries(volume=volume, slices=tuple(f.source for f in kept),
                        summary=_summary(headers, kept), warnings=tuple(check.warnings), prepared_frames=used[0])

"""DICOM series -> geometry-checked `inference.Volume`: from a completed series to a trustworthy volume.

`SeriesSummary` is the routing data: what `route` matches pipeline rules on.
`load_series` turns the instances of one series into a volume a model can use,
or refuses with a `SeriesGeometryError` that names the series and the
instances at fault. `SeriesHeaders` reads the headers once for routing: its
summary, and every check that needs no pixel, so routing can refuse a series
before a job exists. Slices are ordered by Image
Position (Patient) projected on the slice normal (PS3.3 C.7.6.2.1.1), never by
Instance Number, which scanners number in acquisition order, not space.

Memory: the output array is allocated once and filled one frame at a time
(read the file, decode that frame, rescale it into place), so one copy of the
volume exists. It is int16 when every Rescale Slope/Intercept is integral and
the stored bit depth maps into int16 (the usual CT case, half the memory of
float32), float32 otherwise; values are in Rescale Type units (HU for CT).
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.pixels import iter_pixels
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_node import sop_classes
from dicom_node.pipeline.frames import Frame, Headers, SeriesGeometryError, SourceSlice, read_headers
from inference.volume import Volume

__all__ = ["LoadedSeries", "SeriesGeometryError", "SeriesHeaders", "SeriesSummary", "SourceSlice", "VolumeOptions",
           "check_series", "load_series", "summarize_series"]

# Image Orientation (Patient) values equal within this are one orientation (DS rounding is ~1e-6).
_ORIENTATION_TOLERANCE = 1e-3
# Two frames whose positions along the normal differ by less than this are at the same position.
_SAME_POSITION_MM = 0.01
# A stack whose positions drift in-plane by more than this per mm along the normal is sheared (0.06 degrees).
_SHEAR_TOLERANCE = 1e-3
# Photometric Interpretations of grayscale pixels (PS3.3 C.7.6.3.1.2).
_GRAYSCALE = ("MONOCHROME1", "MONOCHROME2")
# A slice normal within 15 degrees of a patient axis names the orientation (else "oblique").
_AXIS_COSINE = math.cos(math.radians(15))


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


@dataclass(frozen=True)
class VolumeOptions:
    """How strict the loader is.

    `spacing_tolerance` is relative to the median gap between slices: a gap
    further from it than this fraction is a missing (or extra) slice.
    `max_voxels` bounds the memory a header can make the loader allocate
    (65,535 x 65,535 is a valid Rows x Columns claim).
    `tilt`: a gantry-tilted (sheared) stack is refused by default, because a
    model trained on orthogonal grids sees a distorted patient otherwise;
    "resample" shifts each slice in-plane onto the orthogonal grid of the
    first slice (linear interpolation, edges padded with the volume minimum).
    """

    min_slices: int = 3
    spacing_tolerance: float = 0.05
    tilt: Literal["resample", "refuse"] = "refuse"
    max_voxels: int = 1 << 30  # 1024^3: a header claiming more is refused before anything is allocated


def _orientation_name(orientations: Sequence[np.ndarray]) -> str:
    if not orientations:
        return "unknown"
    if any(not np.allclose(o, orientations[0], atol=_ORIENTATION_TOLERANCE) for o in orientations):
        return "mixed"
    normal = np.abs(np.cross(orientations[0][:3], orientations[0][3:]))
    axis = int(np.argmax(normal))
    return ("sagittal", "coronal", "axial")[axis] if normal[axis] >= _AXIS_COSINE else "oblique"


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
        return tuple(_check_headers(self.headers.first, self.headers.frames, options).check.warnings)


def summarize_series(paths: Iterable[Path]) -> SeriesSummary:
    """`SeriesHeaders.summary` of the instances at `paths`."""
    return SeriesHeaders.read(paths).summary()


def _at(frame: Frame) -> str:
    """A slice's position as an admin reads it: z for an axial slice, else the whole Image Position."""
    if abs(frame.normal[2]) >= _AXIS_COSINE:
        return f"z={frame.position[2]:.6g} mm"
    return "(" + ", ".join(f"{v:.6g}" for v in frame.position) + ") mm"


class _Check:
    """The geometry checks, in order; each raises with the series and the instances at fault."""

    def __init__(self, series_instance_uid: str, options: VolumeOptions):
        self.series = series_instance_uid
        self.options = options
        self.warnings: list[str] = []

    def fail(self, frames: Iterable[Frame], message: str) -> SeriesGeometryError:
        return SeriesGeometryError(self.series, list(dict.fromkeys(f.uid for f in frames)), message)

    def one_series(self, frames: Sequence[Frame]) -> None:
        uids = Counter(f.series_instance_uid for f in frames)
        if len(uids) > 1:
            main = uids.most_common(1)[0][0]
            raise self.fail([f for f in frames if f.series_instance_uid != main],
                            f"instances from {len(uids)} series given as one: {sorted(uids)}")

    def stack(self, frames: Sequence[Frame]) -> list[Frame]:
        """Exclude localizers, non-images and stray orientations when the rest is one stack.

        An image of the stack's own SOP Class without Image Position or
        Orientation (Patient) is a slice whose place is unknown: refused,
        because leaving it out would look like a missing slice. Another kind
        of image in the series (a Secondary Capture dose screen) is left out.
        """
        localizers = [f for f in frames if f.localizer]
        self._exclude(localizers, "Image Type LOCALIZER")
        rest = [f for f in frames if not f.localizer]
        self._exclude([f for f in rest if not f.is_image], "no pixel matrix: not an image")
        images = [f for f in rest if f.is_image]
        placed = [f for f in images if f.position is not None and f.orientation is not None]
        kinds = Counter(f.source.sop_class_uid for f in placed or images)
        kind = kinds.most_common(1)[0][0] if kinds else None
        unplaced = [f for f in images if f.position is None or f.orientation is None]
        broken = [f for f in unplaced if f.source.sop_class_uid == kind]
        if broken:
            first = broken[0]
            missing = " or ".join(name for name, value in (("Image Position (Patient)", first.position),
                                                           ("Image Orientation (Patient)", first.orientation))
                                  if value is None)
            if len(broken) == 1:
                raise self.fail(broken, f"{first.where} has no {missing}: its place in the volume is unknown")
            raise self.fail(broken, f"{first.where} and {len(broken) - 1} other frame(s) of the instances named "
                                    f"have no {missing}: their place in the volume is unknown")
        self._exclude(unplaced, "no Image Position/Orientation (Patient) and another SOP Class than the stack's")
        groups: list[list[Frame]] = []
        for frame in placed:
            group = next((g for g in groups if np.allclose(g[0].orientation, frame.orientation,
                                                           atol=_ORIENTATION_TOLERANCE)), None)
            if group is None:
                groups.append([frame])
            else:
                group.append(frame)
        groups.sort(key=len, reverse=True)
        if not groups:
            raise self.fail(frames, "no image frames with a position and orientation")
        strays = [f for g in groups[1:] for f in g]
        if len(groups) > 1 and (len(groups[1]) == len(groups[0]) or len(groups[1]) >= self.options.min_slices):
            raise self.fail(strays, f"mixed orientations: {len(groups)} stacks with different Image Orientation "
                                    f"(Patient), sizes {[len(g) for g in groups]}")
        self._exclude(strays, "Image Orientation (Patient) differs from the rest of the stack")
        return groups[0]

    def pixel_format(self, frames: Sequence[Frame]) -> None:
        """Grayscale, one sample per pixel: what a volume of Rescale Type units is made of.

        CT images are MONOCHROME1 or MONOCHROME2 (PS3.3 C.8.2.1.1.1); an RGB or
        YBR series is a screenshot or a mislabelled object, whose colour values
        a CT model would read as Hounsfield units.
        """
        for frame in frames:
            interpretation = frame.photometric_interpretation
            samples = frame.pixel_data.samples_per_pixel
            if interpretation in _GRAYSCALE and samples == 1:
                continue
            same = [f for f in frames
                    if (f.photometric_interpretation, f.pixel_data.samples_per_pixel) == (interpretation, samples)]
            raise self.fail(same, f"Photometric Interpretation {interpretation or '(absent)'} with {samples} "
                                  f"sample(s) per pixel in {len(same)} of {len(frames)} frames: the volume for a "
                                  "model needs MONOCHROME1 or MONOCHROME2 with 1 sample per pixel")

    def frame_of_reference(self, frames: Sequence[Frame]) -> None:
        """One Frame of Reference: positions in two are in unrelated coordinate systems (PS3.3 C.7.4.1)."""
        values = Counter(f.frame_of_reference_uid for f in frames)
        if len(values) > 1:
            main = values.most_common(1)[0][0]
            others = ", ".join(f"{uid or '(absent)'} in {count}" for uid, count in sorted(values.items())
                               if uid != main)
            raise self.fail([f for f in frames if f.frame_of_reference_uid != main],
                            f"mixed Frame of Reference UIDs: {main or '(absent)'} in {values[main]} frame(s), "
                            f"{others} (the instances named); positions in different frames of reference "
                            "cannot be stacked into one volume")

    def referenceable(self, frames: Sequence[Frame]) -> None:
        """Results reference either single-frame instances or the frames of one multi-frame instance
        (highdicom's Segmentation takes one multi-frame source, PS3.3 C.7.6.16.2.6)."""
        problem = next((f for f in frames if f.multiframe_problem), None)
        if problem is not None:
            raise self.fail([problem], problem.multiframe_problem)
        multiframe = list(dict.fromkeys(f.uid for f in frames if f.functional_groups))
        if multiframe and len(set(f.uid for f in frames)) > 1:
            single = len({f.uid for f in frames if not f.functional_groups})
            raise self.fail([f for f in frames if f.functional_groups][:1],
                            f"the stack spans {len(multiframe)} multi-frame and {single} single-frame instance(s): "
                            "a SEG references one multi-frame instance or single-frame instances only")

    def _exclude(self, frames: Sequence[Frame], why: str) -> None:
        if frames:
            uids = ", ".join(dict.fromkeys(f.uid for f in frames))
            self.warnings.append(f"excluded {len(frames)} frame(s) ({why}): {uids}")

    def same_matrix(self, frames: Sequence[Frame]) -> None:
        for name, key in (("Rows/Columns", lambda f: (f.rows, f.columns)),
                          ("Pixel Spacing", lambda f: f.pixel_spacing and tuple(round(v, 4) for v in f.pixel_spacing))):
            values = Counter(key(f) for f in frames)
            if len(values) > 1:
                main = values.most_common(1)[0][0]
                raise self.fail([f for f in frames if key(f) != main],
                                f"mixed {name}: {main} in most instances, {sorted(set(values) - {main}, key=str)} "
                                "in the ones named")
        if frames[0].pixel_spacing is None:
            raise self.fail(frames[:1], "no Pixel Spacing")

    def pixel_data(self, frames: Sequence[Frame], slices: int) -> None:
        """Before anything is allocated or decoded: a size the loader may allocate, pixels as the header says."""
        first = frames[0]
        voxels = slices * first.rows * first.columns
        if voxels > self.options.max_voxels:
            raise self.fail(frames[:1], f"{slices} x {first.rows} x {first.columns} = {voxels} voxels exceeds "
                                        f"the loader's limit of {self.options.max_voxels}")
        for frame in frames:
            native = not sop_classes.is_encapsulated(frame.transfer_syntax) if frame.transfer_syntax else True
            problem = frame.pixel_data.problem(frame.rows, frame.columns, native)
            if problem:
                raise self.fail([frame], problem)

    def positions(self, frames: Sequence[Frame]) -> tuple[list[list[Frame]], np.ndarray]:
        """Frames grouped by position along the normal, ascending; returns (groups, distances)."""
        normal = frames[0].normal
        ordered = sorted(frames, key=lambda f: (float(f.position @ normal), f.uid))
        groups: list[list[Frame]] = []
        for frame in ordered:
            if groups and abs(float((frame.position - groups[-1][0].position) @ normal)) < _SAME_POSITION_MM:
                groups[-1].append(frame)
            else:
                groups.append([frame])
        for group in groups:
            if any(np.linalg.norm(f.position - group[0].position) >= _SAME_POSITION_MM for f in group[1:]):
                raise self.fail(group, f"duplicate slice position {_at(group[0])} along the normal but different "
                                       f"Image Position (Patient): {[list(f.position) for f in group]}")
        if len(groups) < self.options.min_slices:
            raise self.fail([], f"{len(groups)} distinct slice positions, fewer than the minimum "
                                f"{self.options.min_slices}")
        return groups, np.array([float(g[0].position @ normal) for g in groups])

    def uniform(self, groups: Sequence[Sequence[Frame]], distances: np.ndarray) -> float:
        """The slice spacing; a gap off the median by more than the tolerance is named for what it is:
        a missing slice (1.5 spacings or more), a duplicate position (half a spacing or less), or else
        non-uniform spacing."""
        gaps = np.diff(distances)
        median = float(np.median(gaps))
        for k, gap in enumerate(gaps):
            if abs(gap - median) <= self.options.spacing_tolerance * median:
                continue
            below, above = groups[k][0], groups[k + 1][0]
            spacing = f"{gap:.4g} mm apart where the series spacing is {median:.4g} mm"
            if gap >= 1.5 * median:
                raise self.fail([below, above], f"missing slice between {_at(below)} and {_at(above)}: {spacing} "
                                                f"(about {round(gap / median) - 1} slice(s) missing)")
            if gap <= 0.5 * median:
                raise self.fail([below, above], f"duplicate slice position {_at(below)}: instances {below.uid} "
                                                f"and {above.uid} are {spacing}")
            raise self.fail([below, above], f"non-uniform slice spacing between {_at(below)} and {_at(above)}: "
                                            f"{spacing}")
        return float(distances[-1] - distances[0]) / (len(distances) - 1)

    def shear(self, groups: Sequence[Sequence[Frame]]) -> np.ndarray:
        """In-plane offset (mm, LPS) of each slice from the first; non-zero for a gantry-tilted stack."""
        first = groups[0][0]
        normal = first.normal
        steps = np.array([g[0].position - first.position for g in groups])
        offsets = steps - np.outer(steps @ normal, normal)
        extent = float(steps[-1] @ normal)
        drift = float(np.max(np.linalg.norm(offsets, axis=1)))
        if drift <= _SHEAR_TOLERANCE * extent:
            return np.zeros_like(offsets)
        if self.options.tilt == "refuse":
            angle = math.degrees(math.atan2(float(np.linalg.norm(offsets[-1])), extent))
            raise self.fail([first, groups[-1][0]],
                            f"sheared stack (gantry tilt about {angle:.2f} degrees): positions drift "
                            f"{drift:.3g} mm in-plane over {extent:.4g} mm along the normal; "
                            "load with tilt='resample' to resample onto an orthogonal grid")
        self.warnings.append(f"gantry tilt: {drift:.3g} mm in-plane drift over {extent:.4g} mm resampled "
                             "onto the orthogonal grid of the first slice")
        return offsets


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


def _decoded(files: dict[Path, list[Frame]]) -> Iterator[tuple[Frame, np.ndarray]]:
    """Decode only the wanted frames, one file and one frame at a time (pydicom pixel plugins).

    Given a path, pydicom reads one frame's bytes at a time, so a multi-frame
    instance never sits in memory whole; a deflated file (PS3.5 A.5) must be
    inflated whole first.
    """
    for path in sorted(files):
        wanted = sorted(files[path], key=lambda f: f.source.frame_number or 1)
        indices = [(f.source.frame_number or 1) - 1 for f in wanted]
        source = pydicom.dcmread(path) if wanted[0].transfer_syntax == DeflatedExplicitVRLittleEndian else path
        try:
            for frame, pixels in zip(wanted, iter_pixels(source, indices=indices)):
                yield frame, pixels
        except Exception as error:  # truncated or corrupt pixel data: the decoder's words, the file named
            raise SeriesGeometryError(wanted[0].series_instance_uid, (wanted[0].uid,),
                                      f"pixel data of {path.name} cannot be decoded: "
                                      f"{type(error).__name__}: {error}") from error


@dataclass(frozen=True, eq=False)
class _Checked:
    """What the header checks found: the slices (frames grouped by position), where they are, their spacing."""

    check: _Check
    stack: list[Frame]
    groups: list[list[Frame]]
    distances: np.ndarray
    spacing_k: float
    offsets: np.ndarray


def _check_headers(ds: Dataset, frames: Sequence[Frame], options: VolumeOptions) -> _Checked:
    """Every check that needs no decoded pixel, in order."""
    check = _Check(str(ds.get("SeriesInstanceUID", "")), options)
    check.one_series(frames)
    stack = check.stack(frames)
    check.pixel_format(stack)
    check.frame_of_reference(stack)
    check.referenceable(stack)
    check.same_matrix(stack)
    groups, distances = check.positions(stack)
    spacing_k = check.uniform(groups, distances)
    offsets = check.shear(groups)
    check.pixel_data(stack, len(groups))
    return _Checked(check, stack, groups, distances, spacing_k, offsets)


def check_series(paths: Iterable[Path], options: VolumeOptions = VolumeOptions()) -> tuple[str, ...]:
    """`SeriesHeaders.check` of the instances at `paths`."""
    return SeriesHeaders.read(paths).check(options)


def load_series(paths: Iterable[Path], options: VolumeOptions = VolumeOptions()) -> LoadedSeries:
    """Read, check and stack one series; raises `SeriesGeometryError` for a series that would give a wrong volume.

    Volume axes follow SimpleITK: i along the row direction (Image Orientation
    (Patient)[0:3]), j along the column direction ([3:6]), k along their cross
    product, slices ascending; the origin is the first slice's position.
    """
    headers = read_headers(paths)
    checked = _check_headers(headers.first, headers.frames, options)
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
    for frame, pixels in _decoded(_by_file(group[0] for group in groups)):
        _fill(array[slice_of[frame]], frame, pixels)
    scratch = np.empty(array.shape[1:], dtype=dtype)
    for frame, pixels in _decoded(_by_file(f for group in groups for f in group[1:])):
        k = slice_of[frame]
        _fill(scratch, frame, pixels)
        if not np.array_equal(scratch, array[k]):
            raise check.fail([groups[k][0], frame], f"duplicate slice position {_at(frame)}: {groups[k][0].where} "
                                                    f"and {frame.where} hold different pixel values")
    for group in groups:
        if len(group) > 1:
            check.warnings.append(f"duplicate slice position {_at(group[0])}: dropped identical "
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
                        summary=_summary(headers, kept), warnings=tuple(check.warnings))

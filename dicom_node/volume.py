"""DICOM series -> geometry-checked `inference.Volume` (issue: from a completed series to a trustworthy volume).

`SeriesSummary` is the routing data: what `route` matches pipeline rules on.
`load_series` turns the instances of one series into a volume a model can use,
or refuses with a `SeriesGeometryError` that names the series and the
instances at fault. Slices are ordered by Image Position (Patient) projected
on the slice normal (PS3.3 C.7.6.2.1.1), never by Instance Number, which
scanners number in acquisition order, not space.

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
from inference.volume import Volume

# Image Orientation (Patient) values equal within this are one orientation (DS rounding is ~1e-6).
_ORIENTATION_TOLERANCE = 1e-3
# Two frames whose positions along the normal differ by less than this are at the same position.
_SAME_POSITION_MM = 0.01
# A stack whose positions drift in-plane by more than this per mm along the normal is sheared (0.06 degrees).
_SHEAR_TOLERANCE = 1e-3
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


@dataclass(frozen=True)
class SourceSlice:
    """Where one volume slice came from: the SEG references it (PS3.3 C.8.20.2 Derivation Image)."""

    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    frame_number: int | None  # 1-based Frame Number in a multi-frame instance, None for single-frame


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


class SeriesGeometryError(ValueError):
    """A series that cannot become a trustworthy volume; names the series and the instances at fault."""

    def __init__(self, series_instance_uid: str, sop_instance_uids: Sequence[str], message: str):
        self.series_instance_uid = series_instance_uid
        self.sop_instance_uids = tuple(sop_instance_uids)
        self.message = message
        instances = f" (instances: {', '.join(self.sop_instance_uids)})" if self.sop_instance_uids else ""
        super().__init__(f"series {series_instance_uid or '<no Series Instance UID>'}: {message}{instances}")


@dataclass(frozen=True)
class _PixelData:
    """What an instance's header says about its Pixel Data, read without loading it (PS3.5 8.1.1, A.4)."""

    length: int | None  # None: no Pixel Data element
    undefined_length: bool  # encapsulated (compressed) Pixel Data has undefined length, native never
    bits_allocated: int
    bits_stored: int
    samples_per_pixel: int
    frames: int

    def problem(self, rows: int, columns: int, native: bool) -> str | None:
        """Why these pixels cannot be decoded as the header describes them, or None."""
        if self.length is None:
            return "no Pixel Data"
        if self.bits_allocated != 1 and (self.bits_allocated % 8 or not 8 <= self.bits_allocated <= 32):
            return f"Bits Allocated {self.bits_allocated} is not 1, 8, 16 or 32"
        if not 1 <= self.bits_stored <= self.bits_allocated:
            return f"Bits Stored {self.bits_stored} is not within 1..Bits Allocated ({self.bits_allocated})"
        if self.samples_per_pixel != 1:
            return f"Samples per Pixel {self.samples_per_pixel}: not a grayscale image"
        if not native:
            return None if self.undefined_length else "compressed transfer syntax but Pixel Data is not encapsulated"
        if self.undefined_length:
            return "native transfer syntax but Pixel Data has undefined length"
        expected = -(-rows * columns * self.frames * self.bits_allocated // 8)
        if self.length not in (expected, expected + 1):  # + 1: padded to even length
            return (f"Pixel Data is {self.length} bytes; Rows x Columns x frames x Bits Allocated "
                    f"({rows} x {columns} x {self.frames} x {self.bits_allocated}) needs {expected}")
        return None


@dataclass(frozen=True, eq=False)
class _Frame:
    """The geometry and pixel value transformation of one frame, from the headers only."""

    source: SourceSlice
    series_instance_uid: str
    position: np.ndarray | None  # Image Position (Patient), mm
    orientation: np.ndarray | None  # Image Orientation (Patient), 6 direction cosines
    rows: int
    columns: int
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing), PS3.3 10.7.1.3
    slice_thickness: float | None
    slope: float
    intercept: float
    stored_range: tuple[int, int]  # what Bits Stored / Pixel Representation allow
    localizer: bool
    transfer_syntax: str
    pixel_data: _PixelData

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.orientation[:3], self.orientation[3:])

    @property
    def uid(self) -> str:
        return self.source.sop_instance_uid


def _floats(value) -> np.ndarray | None:
    return None if value is None or len(value) == 0 else np.array([float(v) for v in value])


def _functional(ds: Dataset, frame_item: Dataset | None, sequence: str, attribute: str):
    """An attribute of a functional group macro (PS3.3 C.7.6.16): per-frame first, then shared, then top level."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    for groups in (frame_item, shared[0] if shared else None):
        items = groups.get(sequence) if groups is not None else None
        if items and attribute in items[0]:
            return items[0][attribute].value
    return ds.get(attribute)


def _frames_of(path: Path, ds: Dataset) -> list[_Frame]:
    """One `_Frame` per frame of the instance; Enhanced CT keeps geometry in functional groups."""
    meta = getattr(ds, "file_meta", Dataset())
    sop_instance_uid = str(ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID", ""))
    sop_class_uid = str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID", ""))
    bits = int(ds.get("BitsStored", 16) or 16)
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    stored_range = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or ()))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    number_of_frames = int(ds.get("NumberOfFrames", 1) or 1)
    raw = ds.get_item(0x7FE00010, keep_deferred=True)
    pixel_data = _PixelData(
        length=None if raw is None else int(getattr(raw, "length", None) or len(raw.value or b"")),
        undefined_length=raw is not None and bool(getattr(raw, "is_undefined_length", False)
                                                  or getattr(raw, "length", 0) == 0xFFFFFFFF),
        bits_allocated=int(ds.get("BitsAllocated", 16) or 0), bits_stored=bits,
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1), frames=number_of_frames)
    frames = []
    for index in range(number_of_frames):
        item = per_frame[index] if per_frame is not None and index < len(per_frame) else None
        spacing = _floats(_functional(ds, item, "PixelMeasuresSequence", "PixelSpacing"))
        thickness = _functional(ds, item, "PixelMeasuresSequence", "SliceThickness")
        slope = _functional(ds, item, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(ds, item, "PixelValueTransformationSequence", "RescaleIntercept")
        frames.append(_Frame(
            source=SourceSlice(sop_instance_uid, sop_class_uid, path,
                               index + 1 if "NumberOfFrames" in ds else None),
            series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
            position=_floats(_functional(ds, item, "PlanePositionSequence", "ImagePositionPatient")),
            orientation=_floats(_functional(ds, item, "PlaneOrientationSequence", "ImageOrientationPatient")),
            rows=int(ds.get("Rows", 0) or 0),
            columns=int(ds.get("Columns", 0) or 0),
            pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
            slice_thickness=None if thickness in (None, "") else float(thickness),
            slope=1.0 if slope in (None, "") else float(slope),
            intercept=0.0 if intercept in (None, "") else float(intercept),
            stored_range=stored_range,
            localizer="LOCALIZER" in image_type,
            transfer_syntax=str(meta.get("TransferSyntaxUID", "")),
            pixel_data=pixel_data,
        ))
    return frames


# Values longer than this stay on disk while headers are read (Pixel Data, huge private elements).
_DEFER_BYTES = 4096
# Attributes every instance of one series must share: a series mixing them must never reach a model,
# whose result would be filed under one patient and study (PS3.3 C.7.3.1: a series is one study's).
_SERIES_CONSTANTS = ("PatientID", "StudyInstanceUID", "Modality")


def _read_header(path: Path) -> Dataset:
    """The header with every value decoded, so a wrong VR or length fails here, naming the file."""
    try:
        ds = pydicom.dcmread(path, defer_size=_DEFER_BYTES)
        _check_complete(path, ds)
        _decode_values(ds)
    except Exception as error:
        raise SeriesGeometryError("", (path.stem,), f"unreadable header in {path.name}: "
                                                    f"{type(error).__name__}: {error}") from error
    return ds


def _check_complete(path: Path, ds: Dataset) -> None:
    """pydicom reads a truncated file without complaint (short last value, or nothing at all); refuse it.

    Offsets are into the file, except in a deflated one (into the inflated stream), which is not checked.
    """
    if "SOPInstanceUID" not in ds:
        raise ValueError("no SOP Instance UID: the data set could not be parsed")
    if ds.file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
        return
    size = path.stat().st_size
    ends = {}  # tag -> where its value ends, for elements of defined length
    for tag in ds.keys():
        raw = ds.get_item(tag, keep_deferred=True)
        length, offset = getattr(raw, "length", None), getattr(raw, "value_tell", None)
        if length is None or offset is None or length == 0xFFFFFFFF:
            continue
        if offset + length > size:
            raise ValueError(f"the file ends inside {raw.tag} ({size - offset} of its {length} bytes present): "
                             "truncated")
        ends[tag] = offset + length
    last = max(ds.keys(), default=None)  # tags ascend in a data set (PS3.5 7.1): the last one ends the file
    if last in ends and 0 < size - ends[last] < 8:  # less than an element header left: cut inside one
        raise ValueError(f"{size - ends[last]} stray byte(s) after the last element: truncated inside an "
                         "element header")


def _decode_values(ds: Dataset) -> None:
    """Decode every public value; private ones (half of a Siemens header, never used, never
    copied into results) are left raw: decoding them doubled the load time of a real series."""
    for tag in list(ds.keys()):
        if tag.is_private:
            continue
        raw = ds.get_item(tag, keep_deferred=True)
        if getattr(raw, "value", b"") is None:  # deferred: a large value, decoded only if it is used
            continue
        element = ds[tag]
        if element.VR == "SQ":
            for item in element.value:
                _decode_values(item)


@dataclass(frozen=True)
class _Headers:
    """What `_read_headers` found: the dataset carrying the series attributes (the first image's, else the
    first instance's), the image frames, and the SOP classes of the instances without pixel data."""

    first: Dataset
    frames: list[_Frame]
    image_instances: int
    non_images: list[tuple[str, str]]  # (SOP Instance UID, SOP Class UID) of each instance without pixel data

    @property
    def non_image_sop_classes(self) -> list[str]:
        return sorted({sop_class for _, sop_class in self.non_images})


def has_pixel_data(ds: Dataset) -> bool:
    """An image: Pixel Data, Float or Double Float Pixel Data (PS3.3 C.7.6.3, C.7.6.24)."""
    return any(tag in ds for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009))


def _read_headers(paths: Iterable[Path]) -> _Headers:
    """Headers of every instance (pixel data left on disk). Instances without pixel data are set aside:
    they are not checked against the images' series constants, because a volume is made of images only."""
    first: Dataset | None = None
    fallback: Dataset | None = None
    frames: list[_Frame] = []
    images = 0
    others: list[tuple[str, str]] = []
    seen: dict[str, Counter] = {name: Counter() for name in _SERIES_CONSTANTS}
    for path in sorted(Path(p) for p in paths):
        ds = _read_header(path)
        fallback = fallback if fallback is not None else ds
        if not has_pixel_data(ds):
            others.append((str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", ""))))
            continue
        images += 1
        first = first if first is not None else ds
        for name in _SERIES_CONSTANTS:
            seen[name][str(ds.get(name, "") or "")] += 1
        try:
            frames.extend(_frames_of(path, ds))
        except (TypeError, ValueError, IndexError) as error:  # e.g. Rows with two values, Pixel Spacing "x"
            raise SeriesGeometryError(str(ds.get("SeriesInstanceUID", "")), (path.stem,),
                                      f"unusable image attribute values in {path.name}: {error}") from error
    if fallback is None:
        raise SeriesGeometryError("", (), "no instances given")
    first = first if first is not None else fallback
    for name, values in seen.items():
        if len(values) > 1:
            raise SeriesGeometryError(str(first.get("SeriesInstanceUID", "")), (),
                                      f"one series with {len(values)} different {name} values {sorted(values)}: "
                                      "instances of different patients, studies or modalities are never combined")
    return _Headers(first, frames, images, others)


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


def _summary(headers: _Headers, frames: Sequence[_Frame]) -> SeriesSummary:
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


def summarize_series(paths: Iterable[Path]) -> SeriesSummary:
    """Routing data from the headers only: image frames, localizers excluded, are the slices counted."""
    headers = _read_headers(paths)
    images = [f for f in headers.frames if f.position is not None and f.orientation is not None and not f.localizer]
    return _summary(headers, images)


class _Check:
    """The geometry checks, in order; each raises with the series and the instances at fault."""

    def __init__(self, series_instance_uid: str, options: VolumeOptions):
        self.series = series_instance_uid
        self.options = options
        self.warnings: list[str] = []

    def fail(self, frames: Iterable[_Frame], message: str) -> SeriesGeometryError:
        return SeriesGeometryError(self.series, list(dict.fromkeys(f.uid for f in frames)), message)

    def one_series(self, frames: Sequence[_Frame]) -> None:
        uids = Counter(f.series_instance_uid for f in frames)
        if len(uids) > 1:
            main = uids.most_common(1)[0][0]
            raise self.fail([f for f in frames if f.series_instance_uid != main],
                            f"instances from {len(uids)} series given as one: {sorted(uids)}")

    def stack(self, frames: Sequence[_Frame]) -> list[_Frame]:
        """Exclude non-images, localizers and stray orientations when the rest is one stack."""
        images = [f for f in frames if f.position is not None and f.orientation is not None and f.rows]
        kept = set(images)
        self._exclude([f for f in frames if f not in kept],
                      "no Image Position/Orientation (Patient) or no pixel matrix: not part of the volume")
        localizers = [f for f in images if f.localizer]
        self._exclude(localizers, "Image Type LOCALIZER")
        images = [f for f in images if not f.localizer]
        groups: list[list[_Frame]] = []
        for frame in images:
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

    def _exclude(self, frames: Sequence[_Frame], why: str) -> None:
        if frames:
            uids = ", ".join(dict.fromkeys(f.uid for f in frames))
            self.warnings.append(f"excluded {len(frames)} frame(s) ({why}): {uids}")

    def same_matrix(self, frames: Sequence[_Frame]) -> None:
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

    def pixel_data(self, frames: Sequence[_Frame], slices: int) -> None:
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

    def positions(self, frames: Sequence[_Frame]) -> tuple[list[list[_Frame]], np.ndarray]:
        """Frames grouped by position along the normal, ascending; returns (groups, distances)."""
        normal = frames[0].normal
        ordered = sorted(frames, key=lambda f: (float(f.position @ normal), f.uid))
        groups: list[list[_Frame]] = []
        for frame in ordered:
            if groups and abs(float((frame.position - groups[-1][0].position) @ normal)) < _SAME_POSITION_MM:
                groups[-1].append(frame)
            else:
                groups.append([frame])
        for group in groups:
            if any(np.linalg.norm(f.position - group[0].position) >= _SAME_POSITION_MM for f in group[1:]):
                raise self.fail(group, "frames at the same distance along the normal but different "
                                       f"Image Position (Patient): {[list(f.position) for f in group]}")
        if len(groups) < self.options.min_slices:
            raise self.fail([], f"{len(groups)} distinct slice positions, fewer than the minimum "
                                f"{self.options.min_slices}")
        return groups, np.array([float(g[0].position @ normal) for g in groups])

    def uniform(self, groups: Sequence[Sequence[_Frame]], distances: np.ndarray) -> float:
        """The slice spacing; a gap off the median by more than the tolerance is a missing slice."""
        gaps = np.diff(distances)
        median = float(np.median(gaps))
        for k, gap in enumerate(gaps):
            if abs(gap - median) > self.options.spacing_tolerance * median:
                raise self.fail([groups[k][0], groups[k + 1][0]],
                                f"non-uniform slice spacing: {gap:.4g} mm between the instances named where "
                                f"the series spacing is {median:.4g} mm (missing slice?)")
        return float(distances[-1] - distances[0]) / (len(distances) - 1)

    def shear(self, groups: Sequence[Sequence[_Frame]]) -> np.ndarray:
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


def _output_dtype(frames: Sequence[_Frame], resample: bool) -> np.dtype:
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


def _fill(out: np.ndarray, frame: _Frame, pixels: np.ndarray) -> None:
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


def _by_file(frames: Iterable[_Frame]) -> dict[Path, list[_Frame]]:
    files: dict[Path, list[_Frame]] = defaultdict(list)
    for frame in frames:
        files[frame.source.path].append(frame)
    return files


def _decoded(files: dict[Path, list[_Frame]]) -> Iterator[tuple[_Frame, np.ndarray]]:
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


def load_series(paths: Iterable[Path], options: VolumeOptions = VolumeOptions()) -> LoadedSeries:
    """Read, check and stack one series; raises `SeriesGeometryError` for a series that would give a wrong volume.

    Volume axes follow SimpleITK: i along the row direction (Image Orientation
    (Patient)[0:3]), j along the column direction ([3:6]), k along their cross
    product, slices ascending; the origin is the first slice's position.
    """
    headers = _read_headers(paths)
    frames = headers.frames
    check = _Check(str(headers.first.get("SeriesInstanceUID", "")), options)
    if headers.non_images:
        check.warnings.append(f"excluded {len(headers.non_images)} instance(s) without pixel data (not images): "
                              f"{', '.join(uid for uid, _ in headers.non_images)}")
    check.one_series(frames)
    stack = check.stack(frames)
    check.same_matrix(stack)
    groups, distances = check.positions(stack)
    spacing_k = check.uniform(groups, distances)
    offsets = check.shear(groups)
    check.pixel_data(stack, len(groups))
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
            raise check.fail([groups[k][0], frame], f"conflicting duplicates: different pixel values at the "
                                                    f"same position (slice {k}, {distances[k]:.4g} mm)")
    for k, group in enumerate(groups):
        if len(group) > 1:
            check.warnings.append(f"dropped {len(group) - 1} identical duplicate(s) at slice {k}: "
                                  f"{', '.join(f.uid for f in group[1:])} (kept {group[0].uid})")
    if resample:
        pad = float(array.min())
        for k, offset in enumerate(offsets):
            shift = (float(offset @ direction[:, 0]) / column_spacing, float(offset @ direction[:, 1]) / row_spacing)
            array[k] = _shift_in_plane(array[k], shift, pad)

    kept = [g[0] for g in groups]
    volume = Volume(array=array, spacing=(column_spacing, row_spacing, spacing_k),
                    origin=tuple(float(v) for v in first.position), direction=direction)
    return LoadedSeries(volume=volume, slices=tuple(f.source for f in kept),
                        summary=_summary(headers, kept), warnings=tuple(check.warnings))

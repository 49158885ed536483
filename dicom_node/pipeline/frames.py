"""Instance headers -> frames: what the volume checks and the loader read, without loading a pixel.

Every header value is decoded here (a wrong VR, length or truncation fails
naming the file), and each frame of each instance becomes a `Frame`: its
plane (Image Position/Orientation (Patient), per frame in the functional
groups of an Enhanced or Legacy Converted Enhanced image, PS3.3 C.7.6.16),
its pixel value transformation and what the header says about its Pixel Data.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian


@dataclass(frozen=True)
class SourceSlice:
    """Where one volume slice came from: the SEG references it (PS3.3 C.8.20.2 Derivation Image)."""

    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    frame_number: int | None  # 1-based Frame Number in a multi-frame instance, None for single-frame


class SeriesGeometryError(ValueError):
    """A series that cannot become a trustworthy volume; names the series and the instances at fault."""

    def __init__(self, series_instance_uid: str, sop_instance_uids: Sequence[str], message: str):
        self.series_instance_uid = series_instance_uid
        self.sop_instance_uids = tuple(sop_instance_uids)
        self.message = message
        instances = f" (instances: {', '.join(self.sop_instance_uids)})" if self.sop_instance_uids else ""
        super().__init__(f"series {series_instance_uid or '<no Series Instance UID>'}: {message}{instances}")


@dataclass(frozen=True)
class PixelDataHeader:
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
class Frame:
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
    pixel_data: PixelDataHeader
    photometric_interpretation: str
    frame_of_reference_uid: str
    functional_groups: bool  # a multi-frame (enhanced) instance: geometry per frame, PS3.3 C.7.6.16
    # Why results cannot reference this multi-frame instance's frames, or None (see `_multiframe_problem`).
    multiframe_problem: str | None

    @property
    def is_image(self) -> bool:
        """Rows and Columns: this frame is meant to be seen (its Pixel Data is checked later, not here)."""
        return bool(self.rows and self.columns)

    @property
    def where(self) -> str:
        """The frame as an admin finds it: the instance, and the frame number in a multi-frame one."""
        frame = self.source.frame_number
        return f"instance {self.uid}" + (f" frame {frame}" if frame is not None else "")

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


def _multiframe_problem(ds: Dataset) -> str | None:
    """What keeps a SEG from referencing this multi-frame instance's frames, or None.

    highdicom's Segmentation takes Pixel Measures and Plane Orientation of a
    multi-frame source from its Shared Functional Groups (PS3.3 C.7.6.16.1 also
    allows them per frame): a source with them only per frame cannot be
    referenced, so it is refused before inference.
    """
    if "NumberOfFrames" not in ds or "PerFrameFunctionalGroupsSequence" not in ds:
        return None
    shared = ds.get("SharedFunctionalGroupsSequence")
    missing = [name for name in ("PixelMeasuresSequence", "PlaneOrientationSequence")
               if not shared or name not in shared[0]]
    if not missing:
        return None
    return (f"multi-frame instance {ds.get('SOPInstanceUID', '?')} has {' and '.join(missing)} only per frame, "
            "not in the Shared Functional Groups: a SEG cannot reference its frames")


def frames_of(path: Path, ds: Dataset) -> list[Frame]:
    """One `Frame` per frame of the instance; Enhanced CT keeps geometry in functional groups."""
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
    pixel_data = PixelDataHeader(
        length=None if raw is None else int(getattr(raw, "length", None) or len(raw.value or b"")),
        undefined_length=raw is not None and bool(getattr(raw, "is_undefined_length", False)
                                                  or getattr(raw, "length", 0) == 0xFFFFFFFF),
        bits_allocated=int(ds.get("BitsAllocated", 16) or 0), bits_stored=bits,
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1), frames=number_of_frames)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip()
    frame_of_reference_uid = str(ds.get("FrameOfReferenceUID", "") or "")
    multiframe_problem = _multiframe_problem(ds)
    frames = []
    for index in range(number_of_frames):
        item = per_frame[index] if per_frame is not None and index < len(per_frame) else None
        spacing = _floats(_functional(ds, item, "PixelMeasuresSequence", "PixelSpacing"))
        thickness = _functional(ds, item, "PixelMeasuresSequence", "SliceThickness")
        slope = _functional(ds, item, "PixelValueTransformationSequence", "RescaleSlope")
        intercept = _functional(ds, item, "PixelValueTransformationSequence", "RescaleIntercept")
        position = _floats(_functional(ds, item, "PlanePositionSequence", "ImagePositionPatient"))
        orientation = _floats(_functional(ds, item, "PlaneOrientationSequence", "ImageOrientationPatient"))
        for name, value, count in (("Image Position (Patient)", position, 3),
                                   ("Image Orientation (Patient)", orientation, 6)):
            if value is not None and len(value) != count:
                raise ValueError(f"{name} has {len(value)} values, not {count}")
        frames.append(Frame(
            source=SourceSlice(sop_instance_uid, sop_class_uid, path,
                               index + 1 if "NumberOfFrames" in ds else None),
            series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
            position=position,
            orientation=orientation,
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
            photometric_interpretation=photometric,
            frame_of_reference_uid=frame_of_reference_uid,
            functional_groups=per_frame is not None,
            multiframe_problem=multiframe_problem,
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
class Headers:
    """What `read_headers` found: the dataset carrying the series attributes (the first image's, else the
    first instance's), the image frames, and the instances without pixel data."""

    first: Dataset
    frames: tuple[Frame, ...]
    image_instances: int
    non_images: tuple[tuple[str, str], ...]  # (SOP Instance UID, SOP Class UID) of each instance without pixels

    @property
    def non_image_sop_classes(self) -> tuple[str, ...]:
        return tuple(sorted({sop_class for _, sop_class in self.non_images}))


def is_image(ds: Dataset) -> bool:
    """An image: Pixel Data, Float or Double Float Pixel Data (PS3.3 C.7.6.3, C.7.6.24), or an Image Pixel
    module's Rows and Columns without them: a damaged image, which the checks refuse, never a report to
    leave out of the volume (an SR, a KOS, a presentation state, a structure set has neither)."""
    return any(tag in ds for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009)) or ("Rows" in ds and "Columns" in ds)


def read_headers(paths: Iterable[Path]) -> Headers:
    """Headers of every instance (pixel data left on disk). Instances without pixel data (an SR, a KOS, a
    presentation state sent within an image series) are set aside: they are not checked against the
    images' series constants, because a volume is made of images only."""
    first: Dataset | None = None
    fallback: Dataset | None = None
    frames: list[Frame] = []
    images = 0
    others: list[tuple[str, str]] = []
    seen: dict[str, Counter] = {name: Counter() for name in _SERIES_CONSTANTS}
    for path in sorted(Path(p) for p in paths):
        ds = _read_header(path)
        fallback = fallback if fallback is not None else ds
        if not is_image(ds):
            others.append((str(ds.get("SOPInstanceUID", "")), str(ds.get("SOPClassUID", ""))))
            continue
        images += 1
        first = first if first is not None else ds
        for name in _SERIES_CONSTANTS:
            seen[name][str(ds.get(name, "") or "")] += 1
        try:
            frames.extend(frames_of(path, ds))
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
    return Headers(first, tuple(frames), images, tuple(others))

"""Variants of a real CT series that the volume loader must load right or refuse clearly.

Each variant starts from `series_factory.ct_datasets` (the real shared slices,
cropped small so the tests stay fast) and changes what real archives get
wrong: order, duplicates, gaps, localizers, gantry tilt, sizes, Enhanced CT
multi-frame encoding and transfer syntaxes.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)

from tests.series_factory import ct_datasets

ENHANCED_CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2.1")


def small_series(n_slices: int = 8, size: int = 64) -> list[Dataset]:
    """A real-pixel series of `n_slices` `size`x`size` slices, 2 mm apart, ascending along z."""
    return list(ct_datasets(n_slices, rows=size, columns=size))


def expected_hu(datasets: Sequence[Dataset]) -> np.ndarray:
    """The volume a correct loader gives: slices ascending along z, stored values rescaled to HU."""
    ordered = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    return np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in ordered])


def write(datasets: Sequence[Dataset], out_dir: Path, transfer_syntax: UID = ExplicitVRLittleEndian) -> list[Path]:
    """Write Part 10 files named by a random token, so file order says nothing about slice order."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        ds = copy.deepcopy(ds)
        path = out_dir / f"{generate_uid(prefix=None)[-12:]}.dcm"
        if transfer_syntax == RLELossless:
            ds.compress(RLELossless, generate_instance_uid=False)  # pydicom's own RLE encoder
        elif transfer_syntax == ExplicitVRBigEndian:
            # PS3.5 A.3: OW words are big endian too; pydicom writes the bytes as given.
            ds.PixelData = ds.pixel_array.astype(ds.pixel_array.dtype.newbyteorder(">")).tobytes()
            ds.file_meta.TransferSyntaxUID = ExplicitVRBigEndian
            ds.preamble = b"\0" * 128
            dcmwrite(path, ds, little_endian=False, implicit_vr=False, force_encoding=True)
            paths.append(path)
            continue
        else:
            ds.file_meta.TransferSyntaxUID = transfer_syntax
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def renamed(ds: Dataset) -> Dataset:
    """A copy of `ds` as a new instance (new SOP Instance UID)."""
    out = copy.deepcopy(ds)
    out.SOPInstanceUID = generate_uid()
    out.file_meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
    return out


def with_pixels(ds: Dataset, pixels: np.ndarray) -> Dataset:
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint16).tobytes()
    return ds


def shuffled(datasets: Sequence[Dataset], seed: int = 3) -> list[Dataset]:
    """Instance Numbers permuted: order must come from positions, not numbers."""
    out = [copy.deepcopy(ds) for ds in datasets]
    numbers = list(range(1, len(out) + 1))
    random.Random(seed).shuffle(numbers)
    for ds, number in zip(out, numbers):
        ds.InstanceNumber = number
    return out


def with_duplicate(datasets: Sequence[Dataset], index: int, *, conflicting: bool) -> list[Dataset]:
    """A second instance at the position of `datasets[index]`, the same pixels or different ones."""
    duplicate = renamed(datasets[index])
    if conflicting:
        with_pixels(duplicate, duplicate.pixel_array + 100)
    return [*datasets, duplicate]


def without(datasets: Sequence[Dataset], index: int) -> list[Dataset]:
    """A missing slice."""
    return [ds for i, ds in enumerate(datasets) if i != index]


def with_localizer(datasets: Sequence[Dataset]) -> list[Dataset]:
    """A sagittal LOCALIZER scout stored in the same series."""
    scout = renamed(datasets[0])
    scout.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    scout.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    return [scout, *datasets]


def with_other_orientation(datasets: Sequence[Dataset], count: int) -> list[Dataset]:
    """`count` coronal instances (not marked LOCALIZER) mixed into the axial stack."""
    extra = []
    for i in range(count):
        ds = renamed(datasets[i])
        ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
        extra.append(ds)
    return [*datasets, *extra]


def tilted(datasets: Sequence[Dataset], rows_per_slice: int = 1) -> tuple[list[Dataset], float]:
    """A gantry-tilted stack as scanners store it (PS3.3 C.7.6.2.1.1): the image plane tilts about
    the x axis while positions still step along z, so the stack is sheared.

    The tilt is chosen so that each slice is `rows_per_slice` rows further along
    the column direction than the one before: resampling is then a whole-row shift.
    Returns the datasets and the tilt angle in radians.
    """
    ordered = sorted(datasets, key=lambda ds: float(ds.ImagePositionPatient[2]))
    gap = float(ordered[1].ImagePositionPatient[2]) - float(ordered[0].ImagePositionPatient[2])
    row_spacing = float(ordered[0].PixelSpacing[0])
    angle = math.asin(rows_per_slice * row_spacing / gap)
    out = [copy.deepcopy(ds) for ds in ordered]
    for ds in out:
        ds.ImageOrientationPatient = [1, 0, 0, 0, math.cos(angle), math.sin(angle)]
        ds.GantryDetectorTilt = round(math.degrees(angle), 4)
    return out, angle


def with_other_size(datasets: Sequence[Dataset], index: int) -> list[Dataset]:
    """One instance with a smaller pixel matrix than the rest."""
    out = [copy.deepcopy(ds) for ds in datasets]
    with_pixels(out[index], out[index].pixel_array[: out[index].Rows // 2, : out[index].Columns // 2])
    return out


def _item(**attributes) -> DicomSequence:
    item = Dataset()
    for keyword, value in attributes.items():
        setattr(item, keyword, value)
    return DicomSequence([item])


def enhanced_ct(datasets: Sequence[Dataset], *, per_frame_rescale: bool, seed: int = 5) -> Dataset:
    """One Enhanced CT Image instance (PS3.3 A.38) holding the slices as frames, in shuffled order.

    Plane Position is per frame; Pixel Measures and Plane Orientation are
    shared. With `per_frame_rescale`, odd frames store values 24 higher with an
    intercept 24 lower, so only a loader that applies each frame's own Pixel
    Value Transformation gets the right HU.
    """
    frames = list(datasets)
    random.Random(seed).shuffle(frames)
    first = frames[0]
    ds = Dataset()
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "ReferringPhysicianName", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
                    "Modality", "Manufacturer", "SeriesDescription", "BodyPartExamined", "ContrastBolusAgent",
                    "StudyDate", "StudyTime", "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns",
                    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        if keyword in first:
            setattr(ds, keyword, first.data_element(keyword).value)
    ds.SOPClassUID = ENHANCED_CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.InstanceNumber = 1
    ds.NumberOfFrames = len(frames)
    shared = Dataset()
    shared.PixelMeasuresSequence = _item(PixelSpacing=first.PixelSpacing, SliceThickness=first.SliceThickness)
    shared.PlaneOrientationSequence = _item(ImageOrientationPatient=first.ImageOrientationPatient)
    if not per_frame_rescale:
        shared.PixelValueTransformationSequence = _item(
            RescaleSlope=first.RescaleSlope, RescaleIntercept=first.RescaleIntercept, RescaleType="HU")
    ds.SharedFunctionalGroupsSequence = DicomSequence([shared])
    per_frame, pixels = [], []
    for index, frame in enumerate(frames):
        item = Dataset()
        item.PlanePositionSequence = _item(ImagePositionPatient=frame.ImagePositionPatient)
        item.FrameContentSequence = _item(InStackPositionNumber=int(frame.InstanceNumber))
        offset = 24 if per_frame_rescale and index % 2 else 0
        if per_frame_rescale:
            item.PixelValueTransformationSequence = _item(
                RescaleSlope=frame.RescaleSlope, RescaleIntercept=float(frame.RescaleIntercept) - offset,
                RescaleType="HU")
        per_frame.append(item)
        pixels.append(frame.pixel_array.astype(np.uint16) + offset)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    ds.PixelData = np.stack(pixels).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
    ds["PixelData"].VR = "OW"
    return ds


def in_colour(datasets: Sequence[Dataset], photometric_interpretation: str) -> list[Dataset]:
    """The slices as 8-bit three-sample images (a screenshot series filed as CT), `RGB` or `YBR_FULL`."""
    out = [copy.deepcopy(ds) for ds in datasets]
    for ds in out:
        grey = np.clip(ds.pixel_array // 16, 0, 255).astype(np.uint8)
        ds.PixelData = np.repeat(grey[:, :, None], 3, axis=2).tobytes()
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, photometric_interpretation, 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    return out


def with_frame_of_reference(datasets: Sequence[Dataset], count: int) -> list[Dataset]:
    """The last `count` slices in another Frame of Reference (two acquisitions merged into one series)."""
    out = [copy.deepcopy(ds) for ds in datasets]
    other = generate_uid()
    for ds in out[-count:]:
        ds.FrameOfReferenceUID = other
    return out


def without_position(datasets: Sequence[Dataset], index: int) -> list[Dataset]:
    """`datasets[index]` without Image Position (Patient)."""
    out = [copy.deepcopy(ds) for ds in datasets]
    del out[index].ImagePositionPatient
    return out


def with_near_duplicate(datasets: Sequence[Dataset], index: int, offset_mm: float) -> list[Dataset]:
    """A second instance `offset_mm` above `datasets[index]` (a re-reconstructed slice filed in the series)."""
    extra = renamed(datasets[index])
    extra.ImagePositionPatient = [*extra.ImagePositionPatient[:2], float(extra.ImagePositionPatient[2]) + offset_mm]
    return [*datasets, extra]


def legacy_converted_ct(datasets: Sequence[Dataset]) -> Dataset:
    """The slices as one Legacy Converted Enhanced CT Image instance (PS3.3 A.70), made by highdicom the way
    an archive converts a classic series: shared and per-frame functional groups from the slice headers."""
    import highdicom as hd

    return hd.legacy.LegacyConvertedEnhancedCTImage(
        list(datasets), series_instance_uid=str(datasets[0].SeriesInstanceUID), series_number=1,
        sop_instance_uid=generate_uid(), instance_number=1)


MULTIFRAME = {"enhanced": lambda datasets: enhanced_ct(datasets, per_frame_rescale=False),
              "legacy-converted": legacy_converted_ct}
"""Multi-frame CT builders by name, for tests that run every kind."""

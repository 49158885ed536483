"""`dicom-node demo-series OUT`: a sendable CT series made from a folder of real CT slices.

In: a folder holding the slices of one CT series (searched recursively; files
that are not CT Image Storage are passed over), for example the 20 real
JPEG 2000 slices of the workspace's shared data. Out: a series of any length
with new Study, Series, Frame of Reference and SOP Instance UIDs, written
uncompressed (Explicit VR Little Endian) as Part 10 files, so any Storage SCU
can send it and any node receives it as a new study.

A series longer than the source walks the slices back and forth
(0, 1, .., n-1, n-1, .., 0, 0, 1, ..), so the anatomy stays continuous, and
gives every instance its own position along the patient axis. The tests and
benchmarks make their series with the same code (tests/series_factory.py).
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, UID, generate_uid

DEFAULT_SOURCE = Path("../shared/data/ct")  # the workspace's shared data, seen from the repository root
IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.8.498.1")


class DemoSourceError(Exception):
    """The source folder cannot make a series; the message says which folder and why."""


@dataclass(frozen=True)
class Slice:
    """One source slice: its data set (pixel data removed) and its decoded pixels."""

    dataset: Dataset
    pixels: np.ndarray


@dataclass(frozen=True)
class SeriesIds:
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str


def source_slices(source: Path) -> tuple[Slice, ...]:
    """Every CT Image Storage instance under `source`, decoded, sorted foot-to-head by position.

    The SOP Class comes from the file meta when the data set's is blank (anonymised data sets often
    blank it, the Series Instance UID too). Slices in more than one folder or of more than one Series
    Instance UID, or one position held twice, mean the folder holds more than one series: refused.
    """
    if not source.is_dir():
        raise DemoSourceError(f"{source}: not a folder (give --source a folder of CT slices)")
    slices, series = [], set()
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError):
            continue
        sop_class = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
        if sop_class != CTImageStorage or "PixelData" not in ds or "ImagePositionPatient" not in ds:
            continue
        pixels = ds.pixel_array.copy()
        del ds.PixelData
        slices.append(Slice(ds, pixels))
        series.add((path.parent, ds.get("SeriesInstanceUID", "")))
    if not slices:
        raise DemoSourceError(f"{source}: no CT Image Storage instance with pixel data and a position")
    if len(series) > 1:
        folders = ", ".join(sorted({str(folder) for folder, _ in series}))
        raise DemoSourceError(f"{source}: CT slices of {len(series)} series (in {folders}); "
                              "give --source the folder of one")
    slices.sort(key=lambda s: float(s.dataset.ImagePositionPatient[2]))
    positions = [round(float(s.dataset.ImagePositionPatient[2]), 3) for s in slices]
    if len(set(positions)) != len(positions):
        raise DemoSourceError(f"{source}: two slices at the same position: the folder holds more than one "
                              "series; give --source the folder of one")
    return tuple(slices)


def walk(n: int, period: int) -> Iterator[int]:
    """0, 1, .., period-1, period-1, .., 0, 0, 1, ..: continuous anatomy for any length."""
    for index in range(n):
        cycle, offset = divmod(index, period)
        yield offset if cycle % 2 == 0 else period - 1 - offset


def ct_datasets(
    slices: tuple[Slice, ...],
    n_slices: int,
    *,
    rows: int = 512,
    columns: int = 512,
    slice_spacing: float = 2.0,
    ids: SeriesIds | None = None,
    patient_id: str = "DN-DEMO-0001",
    patient_name: str = "Demo^Series",
    series_description: str = "CT Body demo",
) -> Iterator[Dataset]:
    """Yield an uncompressed CT series of `n_slices` made from `slices`, one dataset per slice.

    Slices are `slice_spacing` mm apart from the first source slice's position; rows/columns other
    than the source's crop or tile its pixels.
    """
    ids = ids or SeriesIds(generate_uid(), generate_uid(), generate_uid())
    origin = np.array([float(v) for v in slices[0].dataset.ImagePositionPatient])
    for number, source_index in enumerate(walk(n_slices, len(slices)), start=1):
        template, pixels = slices[source_index].dataset, slices[source_index].pixels
        ds = copy.deepcopy(template)
        if rows != pixels.shape[0] or columns != pixels.shape[1]:
            reps = (-(-rows // pixels.shape[0]), -(-columns // pixels.shape[1]))
            pixels = np.tile(pixels, reps)[:rows, :columns]
        ds.Rows, ds.Columns = rows, columns
        ds.StudyInstanceUID = ids.study_instance_uid
        ds.SeriesInstanceUID = ids.series_instance_uid
        ds.FrameOfReferenceUID = ids.frame_of_reference_uid
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.PatientID = patient_id
        ds.PatientName = patient_name
        ds.SeriesDescription = series_description
        ds.InstanceNumber = number
        position = origin + np.array([0.0, 0.0, (number - 1) * slice_spacing])
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.SliceLocation = round(float(position[2]), 4)
        ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(pixels, dtype=np.uint16).tobytes())
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
        yield ds


def write_series(out_dir: Path, datasets: Iterable[Dataset]) -> list[Path]:
    """Write datasets as Part 10 files named by instance number; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        path = out_dir / f"CT{int(ds.InstanceNumber):05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "demo-series", help="write a sendable CT series (new UIDs) made from a folder of real CT slices")
    parser.add_argument("out_dir", type=Path, metavar="OUT", help="folder to write the series into")
    parser.add_argument("--source", type=Path, default=DEFAULT_SOURCE,
                        help=f"folder of one CT series, searched recursively (default {DEFAULT_SOURCE}, "
                             "the shared data seen from the repository root)")
    parser.add_argument("--slices", type=int, default=40, help="instances to write (default 40)")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.slices < 1:
        print(f"dicom-node demo-series: --slices must be at least 1, got {args.slices}", file=sys.stderr)
        return 2
    try:
        slices = source_slices(args.source)
    except DemoSourceError as error:
        print(f"dicom-node demo-series: {error}", file=sys.stderr)
        return 1
    written = write_series(args.out_dir, ct_datasets(slices, args.slices))
    print(f"{len(written)} CT instances (from {len(slices)} slices of {args.source}) in {args.out_dir}")
    return 0

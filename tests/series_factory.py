"""CT series made from the real shared series, for tests and benchmarks.

The shared data holds 20 real slices; larger series (300, 600 slices) are made
at test time by walking those slices back and forth, so the anatomy stays
continuous, and giving every instance new UIDs and a new position.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, UID, generate_uid

from tests.peers import CT_J2K_SERIES


@lru_cache(maxsize=1)
def real_slices() -> tuple[tuple[Dataset, np.ndarray], ...]:
    """The 20 shared slices, sorted foot-to-head by position, decoded once."""
    items = []
    for path in sorted(CT_J2K_SERIES.iterdir()):
        ds = pydicom.dcmread(path)
        items.append((ds, ds.pixel_array.copy()))
    items.sort(key=lambda item: float(item[0].ImagePositionPatient[2]))
    return tuple(items)


def _walk(n: int, period: int) -> Iterator[int]:
    """0, 1, .., period-1, period-1, .., 0, 0, 1, ..: continuous anatomy for any length."""
    for index in range(n):
        cycle, offset = divmod(index, period)
        yield offset if cycle % 2 == 0 else period - 1 - offset


@dataclass(frozen=True)
class SeriesIds:
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str


def ct_datasets(
    n_slices: int,
    *,
    rows: int = 512,
    columns: int = 512,
    slice_spacing: float = 2.0,
    ids: SeriesIds | None = None,
    patient_id: str = "DN-TEST-0001",
    patient_name: str = "Test^Series",
    series_description: str = "CT Body synthetic",
) -> Iterator[Dataset]:
    """Yield an uncompressed (Explicit VR Little Endian) CT series, one dataset per slice.

    Slices are in acquisition order head-first-supine, 2 mm apart by default;
    rows/columns other than 512 crop or tile the real pixels.
    """
    ids = ids or SeriesIds(generate_uid(), generate_uid(), generate_uid())
    slices = real_slices()
    first = slices[0][0]
    origin = np.array([float(v) for v in first.ImagePositionPatient])
    for number, source_index in enumerate(_walk(n_slices, len(slices)), start=1):
        template, pixels = slices[source_index]
        ds = copy.deepcopy(template)
        del ds.PixelData
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
        ds.file_meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
        yield ds


def write_ct_series(out_dir: Path, n_slices: int, **kwargs) -> list[Path]:
    """Write `ct_datasets(...)` as Part 10 files named by instance number; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in ct_datasets(n_slices, **kwargs):
        path = out_dir / f"CT{int(ds.InstanceNumber):05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m tests.series_factory",
        description="Write a sendable CT series made from the shared real slices (new UIDs, uncompressed).")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--slices", type=int, default=20)
    args = parser.parse_args()
    written = write_ct_series(args.out_dir, args.slices)
    print(f"{len(written)} instances in {args.out_dir}")

"""A generated chest CT: body, two lungs with vessels, trachea and carina, table.

Real chest CT cannot ship with the repository, so the lung tests use this
phantom, whose truth is known exactly. Geometry is in LPS mm
(PS3.3 C.7.6.2.1.1): +x patient left, +y posterior, +z head.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, UID, generate_uid

from inference.volume import Volume

AIR_HU, SOFT_TISSUE_HU, PARENCHYMA_HU, TABLE_HU = -1000.0, 40.0, -850.0, 300.0


@dataclass(frozen=True, eq=False)
class ChestPhantom:
    volume: Volume          # HU, int16
    right_lung: np.ndarray  # truth, bool [k, j, i], vessels included
    left_lung: np.ndarray
    trachea: np.ndarray     # trachea and main bronchi outside the lungs


def _segment_distance(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance of each point (..., 3) to the segment start-end, in mm."""
    axis = end - start
    t = np.clip(((points - start) @ axis) / float(axis @ axis), 0.0, 1.0)
    return np.linalg.norm(points - (start + t[..., None] * axis), axis=-1)


def chest_phantom(
    shape: tuple[int, int, int] = (64, 128, 160),
    spacing: tuple[float, float, float] = (2.5, 2.5, 4.0),
    lung_gap_mm: float = 40.0,
    noise_hu: float = 15.0,
    seed: int = 0,
) -> ChestPhantom:
    """A supine chest on a table, lungs `lung_gap_mm` apart (0 or less: they touch)."""
    k, j, i = shape
    origin = np.array([-(i - 1) / 2 * spacing[0], -(j - 1) / 2 * spacing[1], -(k - 1) / 2 * spacing[2]])
    x = origin[0] + np.arange(i) * spacing[0]
    y = origin[1] + np.arange(j) * spacing[1]
    z = origin[2] + np.arange(k) * spacing[2]
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    points = np.stack([xx, yy, zz], axis=-1)

    hu = np.full(shape, AIR_HU, dtype=np.float32)
    body = (xx / 160.0) ** 2 + (yy / 110.0) ** 2 <= 1.0
    hu[body] = SOFT_TISSUE_HU
    hu[(yy >= 125.0) & (yy <= 135.0) & (np.abs(xx) <= 170.0)] = TABLE_HU

    semi = np.array([60.0, 80.0, 100.0])
    centre_x = lung_gap_mm / 2 + semi[0]
    lung_z = z[0] + 0.42 * (z[-1] - z[0])
    lungs = []
    for side in (-1.0, 1.0):  # -x is the patient's right
        centre = np.array([side * centre_x, 5.0, lung_z])
        lungs.append((((points - centre) / semi) ** 2).sum(axis=-1) <= 1.0)
    right, left = lungs

    carina = np.array([0.0, -10.0, lung_z + 45.0])
    airway = _segment_distance(points, carina, np.array([0.0, -10.0, z[-1] + 10.0])) <= 9.0
    for side in (-1.0, 1.0):
        hilum = np.array([side * (centre_x - 15.0), 0.0, lung_z + 15.0])
        airway |= _segment_distance(points, carina, hilum) <= 6.0
    trachea = airway & ~(right | left)
    right &= ~airway
    left &= ~airway
    hu[right | left] = PARENCHYMA_HU
    hu[airway] = AIR_HU

    for side in (-1.0, 1.0):
        for dx, dy in ((-20.0, -25.0), (15.0, 10.0), (-5.0, 35.0)):
            start = np.array([side * centre_x + dx, dy, lung_z - 60.0])
            vessel = _segment_distance(points, start, start + np.array([0.0, 0.0, 110.0])) <= 3.0
            hu[vessel & (right | left)] = SOFT_TISSUE_HU
    hu += np.random.default_rng(seed).normal(0.0, noise_hu, shape).astype(np.float32)
    volume = Volume(np.round(hu).clip(-1024, 3071).astype(np.int16), spacing, tuple(origin), np.eye(3))
    return ChestPhantom(volume, right, left, trachea)


def write_ct_volume(volume: Volume, out_dir: Path, *, body_part_examined: str = "CHEST",
                    series_description: str = "Chest phantom") -> list[Path]:
    """Write an axial HU volume as a CT Image Storage series (PS3.3 A.3), one file per slice."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    direction = np.asarray(volume.direction, dtype=np.float64)
    paths = []
    for k in range(volume.shape[0]):
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID = "Phantom^Chest", "DN-PHANTOM-0001"
        ds.PatientBirthDate, ds.PatientSex = "", "O"
        ds.StudyDate = ds.SeriesDate = "20260101"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "1", "", ""
        ds.Modality, ds.Manufacturer = "CT", "dicom-node tests"
        ds.BodyPartExamined = body_part_examined
        ds.SeriesDescription = series_description
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.KVP = 120
        ds.SliceThickness = volume.spacing[2]
        position = volume.index_to_lps(np.array([0.0, 0.0, float(k)]))
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*direction[:, 0], *direction[:, 1])]
        ds.SliceLocation = round(float(position[2]), 4)
        ds.PixelSpacing = [volume.spacing[1], volume.spacing[0]]  # row spacing, column spacing
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = -600, 1500
        ds.add_new(0x7FE00010, "OW", np.ascontiguousarray(volume.array[k], dtype=np.int16).tobytes())
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.ImplementationClassUID = UID("1.2.826.0.1.3680043.8.498.1")
        path = out_dir / f"CT{k + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths

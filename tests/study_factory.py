"""A whole study as a scanner and a PACS send it: every kind of object around the CT images.

Minimal but valid-enough instances of each storage class a real study holds
(images of several modalities, SEG, KOS, GSPS, an encapsulated PDF, RT Dose
and Structure Set, the X-Ray Radiation Dose SR, a Comprehensive SR), each in
its own series with Part 10 file meta, made with pydicom at test time. The
headers carry what a Storage SCP and a PACS index need (patient, study,
series, SOP UIDs, modality); the pixel data is a tiny matrix.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import sop_class as sc


@dataclass(frozen=True)
class StudyIds:
    patient_id: str
    patient_name: str
    study_instance_uid: str


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _image(ds: Dataset, rows: int = 16, columns: int = 16, frames: int = 1, bits: int = 16,
           photometric: str = "MONOCHROME2") -> None:
    samples = 3 if photometric == "RGB" else 1
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, columns, samples, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    dtype = np.uint16 if bits == 16 else np.uint8
    ds.PixelData = (np.arange(rows * columns * samples * frames) % 200).astype(dtype).tobytes()


def _plane(ds: Dataset, z: float = 0.0) -> None:
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, z], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 1.0
    ds.FrameOfReferenceUID = generate_uid()


def _mr(ds: Dataset) -> None:
    _plane(ds)
    _image(ds)
    ds.ImageType, ds.ScanningSequence, ds.SequenceVariant, ds.ScanOptions, ds.MRAcquisitionType = \
        ["ORIGINAL", "PRIMARY"], "SE", "NONE", "", "2D"


def _pet(ds: Dataset) -> None:
    _plane(ds)
    _image(ds)
    ds.ImageType, ds.Units, ds.CorrectedImage, ds.RescaleSlope, ds.RescaleIntercept = \
        ["ORIGINAL", "PRIMARY"], "BQML", ["ATTN"], 1, 0


def _projection(ds: Dataset) -> None:  # DX, MG
    _image(ds)
    ds.ImageType, ds.PresentationIntentType, ds.ImagerPixelSpacing = ["ORIGINAL", "PRIMARY"], "FOR PRESENTATION", \
        [0.1, 0.1]


def _us(ds: Dataset) -> None:
    _image(ds, bits=8, photometric="RGB")


def _sc(ds: Dataset) -> None:
    _image(ds, bits=8)
    ds.ConversionType = "WSD"


def _enhanced_ct(ds: Dataset) -> None:
    _image(ds, frames=2)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.FrameOfReferenceUID = generate_uid()
    shared = Dataset()
    measures = Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.5], 1.0
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = Sequence([measures]), Sequence([orientation])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    frames = []
    for index in range(2):
        frame, position = Dataset(), Dataset()
        position.ImagePositionPatient = [0, 0, float(index)]
        frame.PlanePositionSequence = Sequence([position])
        frames.append(frame)
    ds.PerFrameFunctionalGroupsSequence = Sequence(frames)


def _seg(ds: Dataset) -> None:
    _image(ds, bits=8)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.PixelData = np.packbits(np.eye(16, dtype=np.uint8).ravel(), bitorder="little").tobytes()
    ds.SegmentationType, ds.ContentLabel, ds.ImageType = "BINARY", "SEG", ["DERIVED", "PRIMARY"]
    segment = Dataset()
    segment.SegmentNumber, segment.SegmentLabel, segment.SegmentAlgorithmType = 1, "diagonal", "MANUAL"
    segment.SegmentedPropertyCategoryCodeSequence = Sequence([_code("91723000", "SCT", "Anatomical Structure")])
    segment.SegmentedPropertyTypeCodeSequence = Sequence([_code("78961009", "SCT", "Spleen")])
    ds.SegmentSequence = Sequence([segment])


def _structured(title: tuple[str, str, str]) -> Callable[[Dataset], None]:
    def build(ds: Dataset) -> None:
        ds.ValueType, ds.ContinuityOfContent = "CONTAINER", "SEPARATE"
        ds.ConceptNameCodeSequence = Sequence([_code(*title)])
        ds.CompletionFlag, ds.VerificationFlag = "COMPLETE", "UNVERIFIED"
        text = Dataset()
        text.RelationshipType, text.ValueType, text.TextValue = "CONTAINS", "TEXT", "made for a test"
        text.ConceptNameCodeSequence = Sequence([_code("121071", "DCM", "Finding")])
        ds.ContentSequence = Sequence([text])
        ds.ContentDate, ds.ContentTime = "20260101", "120000"
    return build


def _kos(ds: Dataset) -> None:
    _structured(("113000", "DCM", "Of Interest"))(ds)
    del ds.ContentSequence[0]  # a KOS holds references only; none is needed for the store
    ds.CurrentRequestedProcedureEvidenceSequence = Sequence()


def _gsps(ds: Dataset) -> None:
    ds.ContentLabel, ds.PresentationCreationDate, ds.PresentationCreationTime = "GSPS", "20260101", "120000"
    ds.PresentationLUTShape = "IDENTITY"


def _pdf(ds: Dataset) -> None:
    ds.MIMETypeOfEncapsulatedDocument, ds.DocumentTitle = "application/pdf", "Report"
    ds.EncapsulatedDocument = b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n"
    ds.BurnedInAnnotation = "NO"


def _rt_dose(ds: Dataset) -> None:
    _plane(ds)
    _image(ds, frames=2)
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType, ds.DoseGridScaling = "GY", "PHYSICAL", "PLAN", 0.001
    ds.GridFrameOffsetVector = [0, 1]


def _rt_struct(ds: Dataset) -> None:
    ds.StructureSetLabel, ds.StructureSetDate, ds.StructureSetTime = "TEST", "20260101", "120000"
    roi = Dataset()
    roi.ROINumber, roi.ROIName, roi.ROIGenerationAlgorithm = 1, "Body", "MANUAL"
    roi.ReferencedFrameOfReferenceUID = generate_uid()
    ds.StructureSetROISequence = Sequence([roi])


# (name, SOP class, modality, the attributes of the class); the CT images come from the real series.
OBJECTS: tuple[tuple[str, str, str, Callable[[Dataset], None]], ...] = (
    ("enhanced-ct", sc.EnhancedCTImageStorage, "CT", _enhanced_ct),
    ("mr", sc.MRImageStorage, "MR", _mr),
    ("pet", sc.PositronEmissionTomographyImageStorage, "PT", _pet),
    ("dx", sc.DigitalXRayImageStorageForPresentation, "DX", _projection),
    ("mg", sc.DigitalMammographyXRayImageStorageForPresentation, "MG", _projection),
    ("us", sc.UltrasoundImageStorage, "US", _us),
    ("sc", sc.SecondaryCaptureImageStorage, "OT", _sc),
    ("seg", sc.SegmentationStorage, "SEG", _seg),
    ("kos", sc.KeyObjectSelectionDocumentStorage, "KO", _kos),
    ("gsps", sc.GrayscaleSoftcopyPresentationStateStorage, "PR", _gsps),
    ("pdf", sc.EncapsulatedPDFStorage, "DOC", _pdf),
    ("rt-dose", sc.RTDoseStorage, "RTDOSE", _rt_dose),
    ("rt-struct", sc.RTStructureSetStorage, "RTSTRUCT", _rt_struct),
    ("dose-sr", sc.XRayRadiationDoseSRStorage, "SR", _structured(("113701", "DCM", "X-Ray Radiation Dose Report"))),
    ("comprehensive-sr", sc.ComprehensiveSRStorage, "SR", _structured(("18748-4", "LN", "Diagnostic Imaging Report"))),
)
NON_IMAGE = frozenset({"kos", "gsps", "pdf", "rt-struct", "dose-sr", "comprehensive-sr"})


def study_objects(out_dir: Path, ids: StudyIds) -> dict[str, Path]:
    """One instance of each of OBJECTS, each in a new series of the study, written as `<name>.dcm`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for number, (name, sop_class_uid, modality, build) in enumerate(OBJECTS, start=2):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID, ds.SOPInstanceUID = sop_class_uid, generate_uid()
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber = "20260101", "120000", "A1"
        ds.Modality, ds.Manufacturer, ds.SeriesDescription = modality, "TEST", name
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = ids.patient_name, ids.patient_id, "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = ids.study_instance_uid, generate_uid()
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", number, 1
        ds.ReferringPhysicianName = ""
        build(ds)
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = sop_class_uid, ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out_dir / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        written[name] = path
    return written


def study_of(ct_file: Path) -> StudyIds:
    ds = pydicom.dcmread(ct_file, stop_before_pixels=True)
    return StudyIds(str(ds.PatientID), str(ds.PatientName), str(ds.StudyInstanceUID))

"""dicom_node.receive.header reads the receiver's attributes straight from encoded bytes: it must agree with pydicom
on every transfer syntax the node accepts, step over sequences of undefined length and UN, and refuse
a data set that ends too early instead of guessing."""

from __future__ import annotations

import struct
import zlib

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ExplicitVRLittleEndian,
                         ImplicitVRLittleEndian)

from dicom_node.receive.header import HeaderError, InstanceHeader, read_header
from dicom_node.store.spool import part10_header
from tests.peers import CT_J2K_SERIES
from tests.series_factory import ct_datasets


def _encode(ds: Dataset, transfer_syntax: str) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = transfer_syntax != ExplicitVRBigEndian
    buffer.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    write_dataset(buffer, ds)
    data = buffer.getvalue()
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data = compressor.compress(data) + compressor.flush()
    return data


def _expected(ds: Dataset) -> InstanceHeader:
    return InstanceHeader(
        sop_class_uid=str(ds.get("SOPClassUID", "")), sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        study_instance_uid=str(ds.get("StudyInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")), modality=str(ds.get("Modality", "")),
        series_description=str(ds.get("SeriesDescription", "")), patient_id=str(ds.get("PatientID", "")),
        accession_number=str(ds.get("AccessionNumber", "")), study_date=str(ds.get("StudyDate", "")))


def _with_nested_sequences(ds: Dataset) -> Dataset:
    """Sequences of undefined length, nested, with items of undefined length, before the series UID."""
    inner = Dataset()
    inner.CodeValue, inner.CodingSchemeDesignator, inner.CodeMeaning = "T-D4000", "SRT", "Abdomen"
    code_item = Dataset()
    code_item.CodeValue, code_item.CodingSchemeDesignator = "CTABD", "99LOCAL"
    code_item.CodeMeaning = "CT abdomen"
    code_item.AnatomicRegionSequence = Sequence([inner])
    code_item.AnatomicRegionSequence.is_undefined_length = True
    inner.is_undefined_length_sequence_item = True
    code_item.is_undefined_length_sequence_item = True
    ds.ProcedureCodeSequence = Sequence([code_item, Dataset()])
    ds["ProcedureCodeSequence"].is_undefined_length = True
    reference = Dataset()
    reference.ReferencedSOPClassUID = ds.SOPClassUID
    reference.ReferencedSOPInstanceUID = "1.2.3.4.5"
    ds.ReferencedImageSequence = Sequence([reference])  # defined length
    return ds


SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]


@pytest.mark.parametrize("transfer_syntax", SYNTAXES)
def test_agrees_with_pydicom_on_every_uncompressed_syntax(transfer_syntax):
    (ds,) = ct_datasets(1, rows=32, columns=32, series_description="Abdomen 5mm")
    ds = _with_nested_sequences(ds)
    data = _encode(ds, transfer_syntax)
    assert read_header(data, transfer_syntax) == _expected(ds)


def test_explicit_vr_sent_as_implicit_is_read_like_pydicom_reads_it():
    (ds,) = ct_datasets(1, rows=16, columns=16)
    data = _encode(ds, ExplicitVRLittleEndian)
    assert read_dataset(DicomBytesIO(data), True, True).SeriesInstanceUID == ds.SeriesInstanceUID
    assert read_header(data, ImplicitVRLittleEndian) == _expected(ds)


def test_agrees_with_pydicom_on_the_real_jpeg2000_series():
    paths = sorted(CT_J2K_SERIES.iterdir())
    assert paths
    for path in paths:
        raw = path.read_bytes()
        ds = pydicom.dcmread(path)
        data_start = 132 + 12 + struct.unpack_from("<I", raw, 140)[0]  # after preamble, DICM and group 0002
        assert read_header(raw[data_start:], ds.file_meta.TransferSyntaxUID) == _expected(ds), path.name


def test_un_of_undefined_length_is_stepped_over():
    """A private sequence sent as UN keeps an undefined length; its content is implicit VR (PS3.5 6.2.2)."""
    (ds,) = ct_datasets(1, rows=16, columns=16)
    before, after = Dataset(), Dataset()
    for element in ds:
        (before if element.tag < 0x00090000 else after).add(element)
    item = struct.pack("<HHI", 0x0009, 0x1001, 4) + b"abcd"  # implicit VR inside
    un_value = (struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF) + item + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
                + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
    private = (struct.pack("<HH2sH", 0x0009, 0x0010, b"LO", 8) + b"ACME 1.0"
               + struct.pack("<HH2s2xI", 0x0009, 0x1010, b"UN", 0xFFFFFFFF) + un_value)
    data = _encode(before, ExplicitVRLittleEndian) + private + _encode(after, ExplicitVRLittleEndian)
    assert read_header(data, ExplicitVRLittleEndian) == _expected(ds)
    assert read_dataset(DicomBytesIO(data), False, True).SeriesInstanceUID == ds.SeriesInstanceUID


@pytest.mark.parametrize("charset,description", [("ISO_IR 192", "Thorax – Lunge ü"), ("ISO_IR 100", "Schädel")])
def test_series_description_is_decoded_in_the_data_sets_character_set(charset, description):
    (ds,) = ct_datasets(1, rows=16, columns=16)
    ds.SpecificCharacterSet = charset
    ds.SeriesDescription = description
    ds.PatientID, ds.AccessionNumber, ds.StudyDate = f"PID-{description[:3]}", "ACC42", "20260315"
    header = read_header(_encode(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert header.series_description == description
    assert (header.patient_id, header.accession_number, header.study_date) == (
        f"PID-{description[:3]}", "ACC42", "20260315")


def test_missing_attributes_are_empty():
    (ds,) = ct_datasets(1, rows=16, columns=16)
    del ds.SeriesInstanceUID, ds.Modality
    header = read_header(_encode(ds, ExplicitVRLittleEndian), ExplicitVRLittleEndian)
    assert (header.series_instance_uid, header.modality) == ("", "")
    assert header.study_instance_uid == ds.StudyInstanceUID


def test_a_data_set_cut_short_is_an_error():
    (ds,) = ct_datasets(1, rows=16, columns=16)
    data = _encode(_with_nested_sequences(ds), ExplicitVRLittleEndian)
    cut_in_sequence = data.index(b"CTABD") + 2
    cut_in_study_uid = data.index(ds.StudyInstanceUID.encode()) + 4
    for cut in (cut_in_sequence, cut_in_study_uid, 5):
        with pytest.raises(HeaderError):
            read_header(data[:cut], ExplicitVRLittleEndian)
    with pytest.raises(HeaderError):
        read_header(b"not deflated at all", DeflatedExplicitVRLittleEndian)


def test_part10_header_reads_back_with_pydicom():
    (ds,) = ct_datasets(1, rows=16, columns=16)
    data = _encode(ds, ExplicitVRLittleEndian)
    meta = part10_header(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "1.2.826.0.1.3680043.8.498.1",
                         "DICOM_NODE_0.1", "DICOMNODE", "STORESCU")
    stored = pydicom.dcmread(DicomBytesIO(meta + data))
    assert stored.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert stored.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert stored.file_meta.ImplementationClassUID == "1.2.826.0.1.3680043.8.498.1"
    assert stored.file_meta.ImplementationVersionName == "DICOM_NODE_0.1"
    assert stored.file_meta.SourceApplicationEntityTitle == "DICOMNODE"
    assert stored.file_meta.SendingApplicationEntityTitle == "STORESCU"
    assert stored.file_meta.FileMetaInformationGroupLength == len(meta) - 132 - 12
    assert stored.SeriesInstanceUID == ds.SeriesInstanceUID
    odd = part10_header(ds.SOPClassUID, ds.SOPInstanceUID, ExplicitVRLittleEndian, "1.2.3", "X", "DICOMNODE", "A\\B")
    assert "SendingApplicationEntityTitle" not in pydicom.dcmread(DicomBytesIO(odd + data)).file_meta

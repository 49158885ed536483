"""The bad-input corpus: each case is a small CT series broken in one way, generated at test time.

Every case names what the node must do with it:

- `refused`: no instance acknowledged (C-STORE failure status, or no
  presentation context for it), nothing left in the spool;
- `quarantined`: acknowledged, kept in the spool, the series quarantined with
  a reason (bad pixel data, a series mixing patients);
- `unmatched`: valid data no pipeline wants (an MR sent to a CT pipeline),
  kept with the reason no pipeline matched;
- `processed`: odd but valid data (Japanese or Latin-1 names, huge private
  tags) that must go through like any other series.

Byte-level breakage (truncation, wrong lengths, unknown VRs) is done on the
encoded dataset, because pydicom refuses to write most of it; those cases are
sent with `raw_store`.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless,
                         MRImageStorage, RTStructureSetStorage, SecondaryCaptureImageStorage, generate_uid)

from tests.series_factory import ct_datasets

SLICES = 5
MATRIX = 64

Builder = Callable[[list[Dataset]], list[bytes | Dataset]]


@dataclass(frozen=True)
class Case:
    name: str
    expected: frozenset[str]
    build: Builder  # the series' datasets -> what to write (a dataset, or dataset bytes after the file meta)
    raw: bool = False  # send with raw_store (storescu would refuse to send it)
    transfer_syntax: str = ExplicitVRLittleEndian  # what the file meta declares


REFUSED = frozenset({"refused"})
QUARANTINED = frozenset({"quarantined"})
REFUSED_OR_QUARANTINED = frozenset({"refused", "quarantined"})
UNMATCHED = frozenset({"unmatched"})
PROCESSED = frozenset({"processed"})


def series(n: int = SLICES, **kwargs) -> list[Dataset]:
    """A fresh small CT series (new UIDs) that the test pipeline would process."""
    return list(ct_datasets(n, rows=MATRIX, columns=MATRIX, **kwargs))


def encode(ds: Dataset, *, implicit: bool = False, little: bool = True) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = implicit, little
    write_dataset(buffer, ds)
    return buffer.getvalue()


def write_case(case: Case, out_dir: Path) -> list[Path]:
    """The case as Part 10 files (preamble, DICM, a valid file meta naming the declared syntax, the dataset)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    datasets = series()
    paths = []
    for index, (source, item) in enumerate(zip(datasets, case.build(datasets)), start=1):
        body = item if isinstance(item, bytes) else encode(item)
        ds = item if isinstance(item, Dataset) else source
        meta = Dataset()
        meta.FileMetaInformationVersion = b"\x00\x01"
        meta.MediaStorageSOPClassUID = str(ds.get("SOPClassUID", source.SOPClassUID))
        meta.MediaStorageSOPInstanceUID = _meta_uid(ds.get("SOPInstanceUID", source.SOPInstanceUID))
        meta.TransferSyntaxUID = case.transfer_syntax
        meta.ImplementationClassUID = "1.2.826.0.1.3680043.8.498.1"
        header = DicomBytesIO()
        header.is_implicit_VR, header.is_little_endian = False, True
        write_file_meta_info(header, meta, enforce_standard=True)
        path = out_dir / f"{index:03d}.dcm"
        path.write_bytes(b"\0" * 128 + b"DICM" + header.getvalue() + body)
        paths.append(path)
    return paths


def _meta_uid(value) -> str:
    """The meta must stay parseable for the sender; the dataset carries the hostile value."""
    text = str(value)
    return text if text and all(c.isdigit() or c == "." for c in text) and len(text) <= 64 else generate_uid()


# --- byte surgery on an encoded Explicit VR Little Endian dataset ---------------------------------

_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}


def _find(body: bytes, tag: int) -> tuple[int, int, int]:
    """(element start, value start, value length) of a top-level element."""
    needle = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    start = body.find(needle)
    assert start >= 0, f"tag {tag:08X} not in the dataset"
    vr = body[start + 4:start + 6]
    if vr in _LONG_VRS:
        (length,) = struct.unpack("<I", body[start + 8:start + 12])
        return start, start + 12, length
    (length,) = struct.unpack("<H", body[start + 6:start + 8])
    return start, start + 8, length


def set_length(tag: int, length: int) -> Callable[[bytes], bytes]:
    def apply(body: bytes) -> bytes:
        start, value, _ = _find(body, tag)
        field = struct.pack("<I", length) if value - start == 12 else struct.pack("<H", length)
        return body[:value - len(field)] + field + body[value:]
    return apply


def set_vr(tag: int, vr: bytes) -> Callable[[bytes], bytes]:
    def apply(body: bytes) -> bytes:
        start, _, _ = _find(body, tag)
        return body[:start + 4] + vr + body[start + 6:]
    return apply


def overwrite_value(tag: int, filler: bytes) -> Callable[[bytes], bytes]:
    """Replace the value with `filler` repeated to the same length (the element stays well formed)."""
    def apply(body: bytes) -> bytes:
        _, value, length = _find(body, tag)
        return body[:value] + (filler * length)[:length] + body[value + length:]
    return apply


def truncate_at(fraction_of: Callable[[bytes], int]) -> Callable[[bytes], bytes]:
    return lambda body: body[:fraction_of(body)]


def _bytes(*surgery: Callable[[bytes], bytes]) -> Builder:
    def build(datasets: list[Dataset]) -> list[bytes]:
        out = []
        for ds in datasets:
            body = encode(ds)
            for step in surgery:
                body = step(body)
            out.append(body)
        return out
    return build


def _edit(change: Callable[[Dataset, int], None]) -> Builder:
    def build(datasets: list[Dataset]) -> list[Dataset]:
        for index, ds in enumerate(datasets):
            change(ds, index)
        return datasets
    return build


def _setattrs(**values) -> Builder:
    return _edit(lambda ds, _: [setattr(ds, k, v) for k, v in values.items()])


PIXEL_DATA, ROWS, COLUMNS, PATIENT_NAME, PATIENT_ID = 0x7FE00010, 0x00280010, 0x00280011, 0x00100010, 0x00100020
PIXEL_SPACING, IMAGE_POSITION, BITS_ALLOCATED, SERIES_UID = 0x00280030, 0x00200032, 0x00280100, 0x0020000E


def _rows_twice(body: bytes) -> bytes:
    """Rows (US, VM 1) given a second value: length 4."""
    _, value, _ = _find(body, ROWS)
    return body[:value - 2] + b"\x04\x00" + body[value:value + 2] + b"\x00\x00" + body[value + 2:]


# --- the cases ---------------------------------------------------------------------------------------

def _truncated(name: str, cut: Callable[[bytes], int]) -> Case:
    return Case(name, REFUSED_OR_QUARANTINED, _bytes(truncate_at(cut)), raw=True)


def _pixel_start(body: bytes) -> int:
    return _find(body, PIXEL_DATA)[1]


TRUNCATED = [
    _truncated("truncated mid pixel data", lambda b: _pixel_start(b) + 1000),
    _truncated("truncated after pixel data header", _pixel_start),
    _truncated("truncated mid element header", lambda b: _find(b, PIXEL_SPACING)[0] + 3),
    _truncated("truncated inside a UID value", lambda b: _find(b, SERIES_UID)[1] + 5),
    _truncated("truncated to nothing after the meta", lambda b: 0),
]

WRONG_VR_AND_LENGTH = [
    Case("Rows with length 4 (US, VM 1)", REFUSED_OR_QUARANTINED, _bytes(_rows_twice), raw=True),
    Case("Patient Name length past the end", REFUSED_OR_QUARANTINED, _bytes(set_length(PATIENT_NAME, 0xFFF0)),
         raw=True),
    Case("Patient ID odd length shifts the parse", REFUSED_OR_QUARANTINED,
         _bytes(lambda b: set_length(PATIENT_ID, _find(b, PATIENT_ID)[2] + 1)(b)), raw=True),
    Case("unknown VR ZZ", REFUSED_OR_QUARANTINED, _bytes(set_vr(PATIENT_NAME, b"ZZ")), raw=True),
    Case("Rows encoded as VR OB", REFUSED_OR_QUARANTINED,
         _bytes(lambda b: b[:_find(b, ROWS)[0] + 4] + b"OB\x00\x00" + struct.pack("<I", 2) + b[_find(b, ROWS)[1]:]),
         raw=True),
    Case("Pixel Data undefined length without items", REFUSED_OR_QUARANTINED,
         _bytes(set_length(PIXEL_DATA, 0xFFFFFFFF)), raw=True),
    Case("Pixel Spacing not a number", REFUSED_OR_QUARANTINED, _bytes(overwrite_value(PIXEL_SPACING, b"x")), raw=True),
    Case("Image Position not a number", REFUSED_OR_QUARANTINED, _bytes(overwrite_value(IMAGE_POSITION, b"?")),
         raw=True),
    Case("implicit VR body declared explicit", REFUSED_OR_QUARANTINED,
         lambda datasets: [encode(ds, implicit=True) for ds in datasets], raw=True),
    Case("little endian body declared big endian", REFUSED_OR_QUARANTINED,
         _bytes(lambda b: b), raw=True, transfer_syntax=ExplicitVRBigEndian),
    # pydicom sees explicit VRs in the first element and reads the data correctly: a series like any other.
    Case("explicit VR body declared implicit", PROCESSED, _bytes(lambda b: b), raw=True,
         transfer_syntax=ImplicitVRLittleEndian),
    Case("random bytes as the dataset", REFUSED_OR_QUARANTINED,
         lambda datasets: [np.random.default_rng(7).bytes(4096) for _ in datasets], raw=True),
]


def _drop_pixels(ds: Dataset, _: int) -> None:
    del ds.PixelData


def _short_pixels(ds: Dataset, _: int) -> None:
    ds.PixelData = ds.PixelData[: MATRIX * MATRIX]  # half of Rows x Columns x 2 bytes


def _rows_columns(value: int) -> Builder:
    return _setattrs(Rows=value, Columns=value)


PIXELS = [
    Case("missing Pixel Data", QUARANTINED, _edit(_drop_pixels)),
    Case("Pixel Data half of Rows x Columns", QUARANTINED, _edit(_short_pixels)),
    Case("Pixel Data empty", QUARANTINED, _edit(lambda ds, _: setattr(ds, "PixelData", b""))),
    Case("Bits Allocated 8 for 16-bit pixels", QUARANTINED, _setattrs(BitsAllocated=8, BitsStored=8, HighBit=7)),
    Case("Bits Allocated 12", QUARANTINED, _setattrs(BitsAllocated=12)),
    Case("Bits Stored 20 above Bits Allocated 16", QUARANTINED, _setattrs(BitsStored=20, HighBit=19)),
    Case("Samples per Pixel 3 on monochrome data", QUARANTINED, _setattrs(SamplesPerPixel=3)),
    Case("Rows 0", QUARANTINED, _setattrs(Rows=0)),
    Case("65535 x 65535 claimed, 64 x 64 sent", QUARANTINED, _rows_columns(65535)),
    Case("10,000 frames claimed in each instance", QUARANTINED, _setattrs(NumberOfFrames=10000)),
    Case("JPEG 2000 declared, native pixels sent", QUARANTINED, _bytes(lambda b: b), raw=True,
         transfer_syntax=JPEG2000Lossless),
    Case("unknown transfer syntax", REFUSED, _bytes(lambda b: b), raw=True,
         transfer_syntax="1.2.826.0.1.3680043.9.9.9"),
]


def _uid_case(attribute: str, value: str) -> Case:
    return Case(f"{attribute} {value!r}", REFUSED, _setattrs(**{attribute: value}), raw=True)


INVALID_UIDS = [
    _uid_case("SOPInstanceUID", "../../../etc/passwd"),
    _uid_case("SOPInstanceUID", "1.2.3/../../x"),
    _uid_case("SeriesInstanceUID", ".."),
    _uid_case("SeriesInstanceUID", "/tmp/evil"),
    _uid_case("StudyInstanceUID", "..\\..\\windows"),
    _uid_case("StudyInstanceUID", "1." + "9" * 70),
    _uid_case("SOPInstanceUID", ""),
    _uid_case("SeriesInstanceUID", "1.2. 3"),
    _uid_case("StudyInstanceUID", "1.2.3\x00/x"),
]


def _mixed(attribute: str, other: Callable[[], str]) -> Builder:
    """Every second instance of the series gets another value of `attribute`."""
    return _edit(lambda ds, index: setattr(ds, attribute, other()) if index % 2 else None)


SERIES_LEVEL = [
    Case("MR sent to a CT pipeline", UNMATCHED, _setattrs(SOPClassUID=MRImageStorage, Modality="MR")),
    Case("Secondary Capture sent to a CT pipeline", UNMATCHED,
         _setattrs(SOPClassUID=SecondaryCaptureImageStorage, Modality="OT")),
    Case("CT localizers only", UNMATCHED, _setattrs(ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])),
    Case("CT pixels under the RT Structure Set SOP class", QUARANTINED, _setattrs(SOPClassUID=RTStructureSetStorage)),
    Case("mixed-patient series", QUARANTINED, _mixed("PatientID", lambda: "DN-OTHER-PATIENT")),
    Case("mixed-study series", QUARANTINED, _mixed("StudyInstanceUID", generate_uid)),
    Case("mixed-modality series (CT and MR)", QUARANTINED, _mixed("Modality", lambda: "MR")),
    Case("Images in Acquisition 10,000 claimed", PROCESSED, _setattrs(ImagesInAcquisition=10000)),
]


def _charset(charset: list[str] | str, name: str) -> Builder:
    return _setattrs(SpecificCharacterSet=charset, PatientName=name)


def _unknown_charset(datasets: list[Dataset]) -> list[bytes]:
    """Latin-1 bytes under a Specific Character Set value no standard defines."""
    out = []
    for ds in datasets:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "Gómez^Añá"
        out.append(encode(ds).replace(b"ISO_IR 100", b"ISO_IR 999"))
    return out


def _private(ds: Dataset, _: int, size: int = 0, count: int = 0, depth: int = 0) -> None:
    block = ds.private_block(0x0009, "DICOM-NODE RELIABILITY", create=True)
    if size:
        block.add_new(0x00, "OB", np.random.default_rng(1).bytes(size))
    for k in range(count):
        block.add_new(0x10 + k % 0xE0, "LO", f"value {k}") if k < 0xE0 else None
    if depth:
        item = Dataset()
        for _level in range(depth):
            outer = Dataset()
            outer.add_new(0x00091001, "SQ", [item])
            item = outer
        block.add_new(0x02, "SQ", [item])


CHARSETS_AND_PRIVATE = [
    Case("ISO 2022 IR 87 Japanese name", PROCESSED,
         _charset(["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう")),
    Case("ISO_IR 100 Latin-1 name", PROCESSED, _charset("ISO_IR 100", "Müller^Jürgen")),
    Case("ISO_IR 192 UTF-8 name", PROCESSED, _charset("ISO_IR 192", "Ωμέγα^Ζήτα")),
    Case("unknown Specific Character Set", PROCESSED, _unknown_charset, raw=True),
    Case("16 MB private OB element", PROCESSED,
         _edit(lambda ds, i: _private(ds, i, size=16 << 20) if i == 0 else None)),
    Case("224 private elements", PROCESSED, _edit(lambda ds, i: _private(ds, i, count=224))),
    Case("private sequence nested 64 deep", PROCESSED, _edit(lambda ds, i: _private(ds, i, depth=64))),
]


CASES: list[Case] = TRUNCATED + WRONG_VR_AND_LENGTH + PIXELS + INVALID_UIDS + SERIES_LEVEL + CHARSETS_AND_PRIVATE

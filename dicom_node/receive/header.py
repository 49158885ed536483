"""The handful of attributes the receiver needs before it may acknowledge an instance, read from the bytes.

The receiver has to know the Study, Series and SOP Instance UIDs (the spool
path), the Modality and the Series Description (the journal), and the Patient
ID, Accession Number and Study Date an admin finds a study by (the journal's
series row, the console's search) of every data set it is sent, and it must not change the bytes it stores. A full pydicom
parse of a CT header costs about 0.7 ms, a fifth of an instance's whole
budget at storescp's rate, so this module walks the encoded elements instead:
it reads tags and lengths, skips values (sequences of defined or undefined
length included) and stops at the first tag after (0020,000E) Series
Instance UID, which is before the pixel data in any well-formed data set.

Explicit VR little and big endian, implicit VR little endian and the
deflated syntaxes (deflated explicit VR little endian, JPIP referenced
deflate; inflated first) are read (PS3.5 7.1, 10, A.5, A.6); the
encapsulated syntaxes (JPEG, JPEG-LS, JPEG 2000, HTJ2K, JPEG XL, RLE, deflated
image frames, MPEG and HEVC video) encode the data set as explicit VR little
endian. Whether VRs are explicit is read from the first
element, as pydicom does. A data set that ends inside an element, or nests
sequences deeper than any real object does, raises HeaderError.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.uid import ExplicitVRBigEndian, ImplicitVRLittleEndian

from dicom_node.sop_classes import DEFLATED_DATA_SET_SYNTAXES

SPECIFIC_CHARACTER_SET = 0x00080005
SOP_CLASS_UID = 0x00080016
SOP_INSTANCE_UID = 0x00080018
STUDY_DATE = 0x00080020
ACCESSION_NUMBER = 0x00080050
MODALITY = 0x00080060
SERIES_DESCRIPTION = 0x0008103E
PATIENT_ID = 0x00100020
STUDY_INSTANCE_UID = 0x0020000D
SERIES_INSTANCE_UID = 0x0020000E
_WANTED = frozenset({SPECIFIC_CHARACTER_SET, SOP_CLASS_UID, SOP_INSTANCE_UID, STUDY_DATE, ACCESSION_NUMBER, MODALITY,
                     SERIES_DESCRIPTION, PATIENT_ID, STUDY_INSTANCE_UID, SERIES_INSTANCE_UID})
_LAST_WANTED = SERIES_INSTANCE_UID

ITEM = 0xFFFEE000
ITEM_DELIMITATION = 0xFFFEE00D
SEQUENCE_DELIMITATION = 0xFFFEE0DD
UNDEFINED_LENGTH = 0xFFFFFFFF
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2, Table 7.1-1)
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
                        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
_MAX_NESTING = 32


class HeaderError(ValueError):
    """The data set's encoding cannot be followed far enough to find its UIDs."""


@dataclass(frozen=True)
class InstanceHeader:
    """What the receiver reads from a data set; a missing attribute is an empty string."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    series_description: str
    patient_id: str = ""
    accession_number: str = ""
    study_date: str = ""  # DA, YYYYMMDD (PS3.5 6.2)


class _Walker:
    """Steps over the elements of one encoding; collects the wanted top-level values."""

    def __init__(self, data: bytes | memoryview, explicit_vr: bool, little_endian: bool):
        self.data = data
        self.explicit_vr = explicit_vr
        order = "<" if little_endian else ">"
        self.tag_length = struct.Struct(order + "HHI")  # implicit VR, and item / delimiter headers
        self.explicit_short = struct.Struct(order + "HH2sH")
        self.explicit_long = struct.Struct(order + "HH2s2xI")
        self.values: dict[int, bytes] = {}

    def element(self, pos: int, explicit_vr: bool) -> tuple[int, bytes | None, int, int]:
        """(tag, VR or None, value length, value position) of the element at `pos`."""
        data = self.data
        if pos + 8 > len(data):
            raise HeaderError(f"data set ends inside an element header at byte {pos}")
        if explicit_vr:
            group, element, vr, length = self.explicit_short.unpack_from(data, pos)
            tag = group << 16 | element
            if group == 0xFFFE:  # item and delimiters carry no VR in any syntax
                group, element, length = self.tag_length.unpack_from(data, pos)
                return tag, None, length, pos + 8
            if vr in _LONG_VRS:
                if pos + 12 > len(data):
                    raise HeaderError(f"data set ends inside an element header at byte {pos}")
                _, _, _, length = self.explicit_long.unpack_from(data, pos)
                return tag, vr, length, pos + 12
            return tag, vr, length, pos + 8
        group, element, length = self.tag_length.unpack_from(data, pos)
        return group << 16 | element, None, length, pos + 8

    def dataset(self, pos: int, end: int | None, explicit_vr: bool, depth: int, top_level: bool) -> int:
        """Walk a data set from `pos` to `end` (an item's length) or to its item delimiter (end None)."""
        if depth > _MAX_NESTING:
            raise HeaderError(f"sequences nested deeper than {_MAX_NESTING}")
        limit = len(self.data) if end is None else end
        while pos < limit:
            tag, vr, length, value = self.element(pos, explicit_vr)
            if tag == ITEM_DELIMITATION and end is None:
                return value
            if top_level and tag > _LAST_WANTED:
                return limit
            if length == UNDEFINED_LENGTH:
                # A sequence, encapsulated pixel data or UN of undefined length; UN content is implicit VR
                # little endian (PS3.5 6.2.2 note 4), and so is an implicit-VR undefined-length element.
                nested_explicit = explicit_vr and vr != b"UN"
                pos = self.sequence(value, nested_explicit, depth + 1)
                continue
            pos = value + length
            if pos > len(self.data):
                raise HeaderError(f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) runs past the end of the data set")
            if top_level and tag in _WANTED:
                self.values[tag] = bytes(self.data[value:pos])
        if end is None:
            raise HeaderError("data set ends inside an item of undefined length")
        return pos

    def sequence(self, pos: int, explicit_vr: bool, depth: int) -> int:
        """Skip the items of an undefined-length value; returns the position after its delimiter."""
        while True:
            tag, _, length, value = self.element(pos, explicit_vr=False)
            if tag == SEQUENCE_DELIMITATION:
                return value
            if tag != ITEM:
                raise HeaderError(f"expected an item in a sequence at byte {pos}, found ({tag >> 16:04X},"
                                  f"{tag & 0xFFFF:04X})")
            if length == UNDEFINED_LENGTH:
                pos = self.dataset(value, None, explicit_vr, depth, top_level=False)
            else:
                pos = value + length
                if pos > len(self.data):
                    raise HeaderError("an item runs past the end of the data set")


def _text(raw: bytes | None) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", errors="replace") if raw else ""


def read_header(data: bytes | memoryview, transfer_syntax: str) -> InstanceHeader:
    """The receiver's attributes of the data set `data` (no file meta) encoded in `transfer_syntax`."""
    if transfer_syntax in DEFLATED_DATA_SET_SYNTAXES:
        try:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        except zlib.error as error:
            raise HeaderError(f"deflated data set does not inflate: {error}") from None
    # Like pydicom, trust the first element over the transfer syntax on whether VRs are explicit: some
    # senders declare implicit VR and send explicit (PS3.5 leaves a reader to cope).
    first_vr = bytes(data[4:6])
    explicit_vr = first_vr in _SHORT_VRS or first_vr in _LONG_VRS if len(data) >= 6 \
        else transfer_syntax != ImplicitVRLittleEndian
    walker = _Walker(data, explicit_vr=explicit_vr, little_endian=transfer_syntax != ExplicitVRBigEndian)
    walker.dataset(0, len(data), walker.explicit_vr, depth=0, top_level=True)
    values = walker.values
    charsets = [c.strip() for c in _text(values.get(SPECIFIC_CHARACTER_SET)).split("\\")] or [""]

    def decoded(tag: int) -> str:
        """A text value in the data set's character set (LO, SH: PS3.5 6.1.2.3)."""
        raw = values.get(tag, b"").rstrip(b"\x00 ")
        return decode_bytes(raw, convert_encodings(charsets), set()) if raw else ""

    return InstanceHeader(
        sop_class_uid=_text(values.get(SOP_CLASS_UID)), sop_instance_uid=_text(values.get(SOP_INSTANCE_UID)),
        study_instance_uid=_text(values.get(STUDY_INSTANCE_UID)),
        series_instance_uid=_text(values.get(SERIES_INSTANCE_UID)),
        modality=_text(values.get(MODALITY)), series_description=decoded(SERIES_DESCRIPTION),
        patient_id=decoded(PATIENT_ID), accession_number=decoded(ACCESSION_NUMBER),
        study_date=_text(values.get(STUDY_DATE)).strip())

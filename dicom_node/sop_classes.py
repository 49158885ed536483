"""What the node accepts: every standard storage SOP class in every transfer syntax, narrowed by config.

A scanner or PACS sends a whole study: the images, and with them the dose
report (X-Ray Radiation Dose SR), key images (KOS), presentation states, PDFs,
RT objects. A Storage SCP that refuses one of them makes dcmtk's storescu stop,
dcmsend abort and an Orthanc routing job fail as a whole, so the node accepts
every storage SOP class of pynetdicom's registry (PS3.4 Annex B, the Storage
Service Class). It stores the bytes as received and never transcodes (PS3.5
10: the sender's transfer syntax is kept), so it accepts every transfer syntax
a network may carry, compressed ones included: decoding happens only when a
pipeline needs pixels. An admin may narrow the classes with
`node.sop_classes.allow` / `deny` (keywords such as CTImageStorage, or UIDs).
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import RE_VALID_UID, UID
from pynetdicom.sop_class import _STORAGE_CLASSES

STORAGE_CLASSES: dict[str, str] = dict(_STORAGE_CLASSES)  # keyword -> UID
_KEYWORD_OF = {uid: keyword for keyword, uid in STORAGE_CLASSES.items()}
DICOM_ROOT = "1.2.840.10008."

# Transfer syntaxes PS3.6 Table A-1 defines that pydicom's dictionary does not know yet.
_NEWER_TRANSFER_SYNTAXES = {
    "1.2.840.10008.1.2.4.110": "JPEG XL Lossless",
    "1.2.840.10008.1.2.4.111": "JPEG XL JPEG Recompression",
    "1.2.840.10008.1.2.4.112": "JPEG XL",
    "1.2.840.10008.1.2.8.1": "Deflated Image Frame Compression",
}
# Defined for media or documents, never negotiated on a network (PS3.5 A.4, retired 6.1/6.2; PS3.6 Papyrus).
_NOT_NETWORK = {"1.2.840.10008.1.2.6.1", "1.2.840.10008.1.2.6.2", "1.2.840.10008.1.20"}
TRANSFER_SYNTAXES: tuple[str, ...] = tuple(
    [uid for uid, entry in UID_dictionary.items() if entry[1] == "Transfer Syntax" and uid not in _NOT_NETWORK]
    + list(_NEWER_TRANSFER_SYNTAXES))
# Whose whole data set is deflated (PS3.5 A.5; JPIP Referenced Deflate, A.6): the header reader inflates them.
DEFLATED_DATA_SET_SYNTAXES = frozenset({"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95",
                                        "1.2.840.10008.1.2.4.205"})


# The native encodings (PS3.5 A.1-A.5); every other network syntax encapsulates its pixel data (A.4).
NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
                             "1.2.840.10008.1.2.1.99"})


def is_encapsulated(transfer_syntax: str) -> bool:
    """Pixel data in fragments (PS3.5 A.4). pydicom's UID.is_compressed raises for the syntaxes its
    dictionary does not know yet (JPEG XL, deflated image frames), which the node still receives."""
    return transfer_syntax not in NATIVE_SYNTAXES


def is_image_class(uid: str) -> bool:
    """Can instances of this SOP class be slices of a volume? The standard's image storage classes
    (CT, Enhanced CT, MR, ... "Image Storage"), and any private class, which only its maker knows;
    not a structure set, dose grid, segmentation or parametric map that happens to carry pixels."""
    return not uid.startswith(DICOM_ROOT) or "Image Storage" in name(uid)


def name(uid: str) -> str:
    """The standard name of a SOP class or transfer syntax UID, or the UID itself when it has none."""
    if uid in _NEWER_TRANSFER_SYNTAXES:
        return _NEWER_TRANSFER_SYNTAXES[uid]
    text = UID(uid).name
    return text if text and text != uid else uid


def resolve(value: str) -> str:
    """The UID a config entry names: a storage class keyword, a standard storage class UID or a private
    UID. Raises ValueError with what was wrong."""
    value = value.strip()
    if value in STORAGE_CLASSES:
        return STORAGE_CLASSES[value]
    if value in _KEYWORD_OF:
        return value
    if len(value) > 64 or not RE_VALID_UID.match(value):  # PS3.5 9.1
        raise ValueError(f"{value!r} is neither a storage SOP class keyword (such as CTImageStorage) nor a UID")
    if value.startswith(DICOM_ROOT):
        raise ValueError(f"{value} is not a standard storage SOP class UID ({name(value)})")
    return value  # a private SOP class (an admin may accept one by naming it)


def accepted_classes(allow: Iterable[str] | None, deny: Iterable[str]) -> list[str]:
    """The storage SOP class UIDs to negotiate: `allow` (resolved UIDs; None is every standard class)
    less `deny`."""
    denied = set(deny)
    chosen = STORAGE_CLASSES.values() if allow is None else allow
    return [uid for uid in dict.fromkeys(chosen) if uid not in denied]

"""A second copy of a stored SOP Instance UID: the same instance re-sent, or another payload under its UID.

A sender re-sends what it is not sure was stored (a retry after a timeout, a
whole series after a crash, a PACS routing rule run twice): that copy has the
same content, often the same bytes, and is a plain duplicate. A different
payload under the same SOP Instance UID is another matter: a modality that
re-used a UID, an edited object re-sent without a new UID, or corruption.
PS3.4 B.4.1 leaves it to the SCP; the node answers success as dcmtk's storescp
does (a refusal makes the sender retry forever), keeps its first copy in the
spool, and keeps the newcomer in the quarantine with both digests, so nothing
is dropped and an admin can see which one is right.

"Same content" is the same bytes, or, when the bytes differ (another transfer
syntax, another sender's encoder), the same data elements with the same values
once both are parsed.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from dicom_node.store.spool import data_set_of


@dataclass(frozen=True)
class Conflict:
    """Another payload under a stored SOP Instance UID: sha256 of each data set (without file meta)."""

    stored_sha256: str
    received_sha256: str


def _parsed(part10: bytes) -> Dataset:
    ds = pydicom.dcmread(io.BytesIO(part10), force=True)
    ds.file_meta = pydicom.dataset.FileMetaDataset()  # compare content, not who wrote the file
    return ds


def conflict(stored_path: Path, meta: bytes, data_set: bytes | memoryview) -> Conflict | None:
    """None when `data_set` (with its file `meta`) has the content of the file at `stored_path`."""
    stored_file = stored_path.read_bytes()
    stored = data_set_of(stored_file)
    if stored == data_set:
        return None
    try:
        if _parsed(stored_file) == _parsed(meta + data_set):
            return None
    except Exception:  # one of them does not parse: not the same content
        pass
    return Conflict(hashlib.sha256(stored).hexdigest(), hashlib.sha256(data_set).hexdigest())

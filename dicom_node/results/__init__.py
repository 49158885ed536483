"""Results stage: what `inference` returns, encoded as DICOM a PACS stores and shows.

One writer per information object: `seg.write_seg` (Segmentation, PS3.3 A.51),
`sr.write_report` (Comprehensive SR, TID 1500: the job's one measurement
report), `overlay.write_overlay` and `keyimage.write_key_images` (Secondary
Capture with burned-in outlines, key images). Each puts
its objects in a new series of the source study, with UIDs derived from the
job (`uids.UidSeed`) so that re-running a job rewrites the same objects.
`segread.read_seg` reads SEGs back, ours and others'.

This module holds what the writers share: who is writing (`OutputSeries`) and
how a file reaches the job folder (`write_atomically`, `save_dataset`), and
the coding scheme of concepts no standard codes (`LOCAL_SCHEME`).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import pydicom
from pydicom.multival import MultiValue

from dicom_node.results.uids import UidSeed

if TYPE_CHECKING:
    from dicom_node.config.results import ResultsConfig

try:
    from importlib.metadata import version as _version

    NODE_VERSION = _version("dicom-node")
except Exception:  # pragma: no cover - running from a source tree that is not installed
    NODE_VERSION = "0"


# Private coding scheme of the concepts no standard codes (PS3.16 8.2: a "99" prefix is local).
LOCAL_SCHEME = "99DCMNODE"


@dataclass(frozen=True)
class OutputSeries:
    """Identity of one output series: its UIDs' seed and the equipment that wrote it.

    Manufacturer, model and software versions go into the General Equipment and
    Enhanced General Equipment modules (PS3.3 C.7.5.1, C.7.5.2), which SEG and
    SR require; a PACS user sees them as "who made this".
    """

    seed: UidSeed
    series_number: int
    series_description: str
    manufacturer: str = "dicom-node"
    manufacturer_model_name: str = "dicom-node"
    software_versions: str = NODE_VERSION
    device_serial_number: str = socket.gethostname()[:64] or "0"

    @classmethod
    def from_config(
        cls, results: ResultsConfig, *, kind: str, series_instance_uid: str, generation: int, pipeline: str,
        position: int, description: str,
    ) -> OutputSeries:
        """The output series of `kind` ("seg", "sr", "overlay", "keyimage") of one job, numbered and named per config;
        `position` is the pipeline's place in the config's `pipelines` (see `series_number`).

        SeriesDescription is "<series_description_prefix> <description>" (e.g. "AI spleen").
        """
        return cls(
            seed=UidSeed(series_instance_uid, generation, pipeline, results.org_root),
            series_number=series_number(results, kind, position, generation),
            series_description=f"{results.series_description_prefix} {description}".strip(),
            manufacturer=results.manufacturer,
        )


PIPELINE_SERIES_STEP = 10
GENERATION_SERIES_STEP = 1000


def series_number(results: ResultsConfig, kind: str, position: int, generation: int) -> int:
    """SeriesNumber (0020,0011) of a job's output series of `kind`.

    A viewer lists a study's series by number, so two result series of one study must not share one:
    the configured number of the kind (9901 SEG, 9902 SR, 9903 overlay, 9904 key images), plus 10 for
    each pipeline before this one in the config (spleen_ct 9901/9902, chest_ct 9911/9912), plus 1000 for each
    generation after the first (a series sent again gets new result series beside the earlier ones).
    A job run again writes the same number, as it writes the same UIDs. Distinct for up to 100
    pipelines; the config keeps the kinds' numbers within 10 of each other.
    """
    base = getattr(results, f"{kind}_series_number")
    return base + PIPELINE_SERIES_STEP * position + GENERATION_SERIES_STEP * (generation - 1)


COPIED_TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                 "ReferringPhysicianName", "StudyID", "AccessionNumber")
"""Patient and General Study module attributes of type 2 that every result copies from its source."""


def source_headers(sources: Sequence[pydicom.Dataset]) -> list[pydicom.Dataset]:
    """The source headers with SOP Class and SOP Instance UIDs present, as results reference them.

    Anonymisers and some archives leave (0008,0016)/(0008,0018) empty in the
    data set while the File Meta keeps Media Storage SOP Class/Instance UID
    (PS3.10 7.1); the shared real series is such a case. References (PS3.3
    C.7.6.16.2.6, C.17.2) need both, so they are taken from the File Meta. The
    caller's data sets are not modified. The Specific Character Set the
    results copy from the source is put in the form highdicom accepts
    (`result_character_set`). The Patient and Study attributes a result copies
    (`COPIED_TYPE_2`) are type 2, present even when empty (PS3.3 C.7.1.1,
    C.7.2.1); a source that leaves them out, as some anonymisers and exports do,
    gets them empty, as highdicom reads every one of them.
    """
    repaired = []
    for source in sources:
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
            if not source.get(keyword):
                raise ValueError(f"source instance {source.get('SOPInstanceUID', '?')} has an empty {keyword}")
        character_set = result_character_set(source.get("SpecificCharacterSet"))
        missing = [keyword for keyword in COPIED_TYPE_2 if keyword not in source]
        if source.get("SOPClassUID") and source.get("SOPInstanceUID") and character_set == source.get(
                "SpecificCharacterSet") and not missing:
            repaired.append(source)
            continue
        meta = getattr(source, "file_meta", None) or pydicom.Dataset()
        values = {keyword: "" for keyword in missing}
        values["SOPClassUID"] = source.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID")
        values["SOPInstanceUID"] = source.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID")
        if not (values["SOPClassUID"] and values["SOPInstanceUID"]):
            raise ValueError("a source instance has no SOP Class/Instance UID, in the data set or its File Meta")
        values["SpecificCharacterSet"] = character_set
        copy = pydicom.Dataset()
        copy.update(source)  # its own table of elements, sharing the caller's: each one changed is replaced
        copy.file_meta = meta
        for keyword, value in values.items():
            copy.pop(keyword, None)
            if value is not None:
                setattr(copy, keyword, value)
        repaired.append(copy)
    return repaired


def result_character_set(value) -> str | list[str] | None:
    """Specific Character Set (0008,0005) for a result whose text comes from a source with `value`.

    PS3.3 C.12.1.1.2 lets the first of several values be empty, meaning ISO
    2022 IR 6 (Japanese sources send `\\ISO 2022 IR 87`); highdicom needs the
    name. A term no edition defines (pydicom decoded the source with its
    default) becomes ISO_IR 192: the copied strings are Unicode by now and
    UTF-8 encodes all of them.
    """
    from highdicom.enum import SpecificCharacterSetValues

    if value is None or value == "":
        return None
    values = [str(v).strip() for v in (value if isinstance(value, list | tuple | MultiValue) else [value])]
    if len(values) > 1 and values[0] == "":
        values[0] = SpecificCharacterSetValues.DEFAULT_REPERTOIRE_CODE_EXTENSIONS.value
    known = {member.value for member in SpecificCharacterSetValues}
    if not all(v in known for v in values):
        return SpecificCharacterSetValues.UNICODE_IN_UTF8.value
    return values if len(values) > 1 else values[0]


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> Path:
    """Write a file so that `path` is either absent or complete, even after a crash.

    Temp file in the same folder, fsync, rename over `path`, fsync the folder:
    the dispatcher never sends a half-written object.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def save_dataset(dataset: pydicom.Dataset, path: Path) -> Path:
    """`write_atomically` for a Part 10 file (preamble, DICM, File Meta: PS3.10 7.1)."""
    return write_atomically(path, lambda handle: dataset.save_as(handle, enforce_file_format=True))

"""A label map as a DICOM Segmentation (PS3.3 A.51) in a new series of the source study.

Classic Segmentation Storage (1.2.840.10008.5.1.4.1.1.66.4) with BINARY frames
is the default: it is what every PACS and viewer we met stores and shows
(Orthanc and dcmtk's storescu refuse the newer Label Map Segmentation Storage,
66.7, that LABELMAP writes). highdicom builds the object: it copies the Patient
and Study modules from the source, keeps the StudyInstanceUID and
FrameOfReferenceUID, and writes one Derivation Image / Source Image reference
per frame to the exact source instance (PS3.3 C.7.6.16.2.6), so a viewer puts
each frame on its CT slice. A multi-frame source (Enhanced CT, Legacy Converted
Enhanced CT) is referenced frame by frame: each SEG frame's Source Image names
the source instance and its Referenced Frame Number.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import highdicom as hd
import numpy as np
import pydicom
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from dicom_node.results import OutputSeries, save_dataset, source_headers
from dicom_node.results.uids import UidSeed
from inference.results import Algorithm, Code, LabelMap, SegmentLabel

if TYPE_CHECKING:
    from dicom_node.config.results import ResultsConfig

SEG_KIND = "seg"


@dataclass(frozen=True)
class SegOptions:
    """How a label map becomes a SEG (from `ResultsConfig` plus the job's `OutputSeries`).

    `omit_empty_frames` is off by default: several viewers mis-render SEGs that
    leave out the frames of slices without segment pixels.
    `compress` writes JPEG 2000 Lossless frames, the only encapsulated syntax
    PS3.5 8.2 and highdicom allow for 1-bit BINARY frames (PS3.3 C.8.20.2.1):
    30x smaller. Readers differ on it: pydicom/pylibjpeg and highdicom decode
    it, GDCM 3 (SimpleITK 2.5) refuses 1-bit JPEG 2000 and dcmtk decodes no
    JPEG 2000 at all; turn it off for destinations read by those.
    """

    series: OutputSeries
    segmentation_type: Literal["BINARY", "LABELMAP"] = "BINARY"
    omit_empty_frames: bool = False
    empty: Literal["write", "skip"] = "write"
    compress: bool = True
    content_creator_name: str = "dicom-node^"

    @classmethod
    def from_config(cls, results: ResultsConfig, series: OutputSeries) -> SegOptions:
        return cls(
            series=series,
            omit_empty_frames=results.seg_omit_empty_frames,
            empty=results.empty_segmentation,
            compress=results.compress_frames,
        )


class SourceGridError(ValueError):
    """The label map is not on the grid of the source instances it is said to derive from."""


def write_seg(
    label_maps: LabelMap | Sequence[LabelMap], sources: Sequence[pydicom.Dataset], out_dir: Path, options: SegOptions,
    frame_numbers: Sequence[int | None] | None = None,
) -> Path | None:
    """Write `build_seg`'s SEG in `out_dir`; returns its path, or None for a skipped empty mask."""
    segmentation = build_seg(label_maps, sources, options, frame_numbers)
    if segmentation is None:
        return None
    return save_dataset(segmentation, out_dir / f"SEG_{segmentation.SOPInstanceUID}.dcm")


def build_seg(
    label_maps: LabelMap | Sequence[LabelMap], sources: Sequence[pydicom.Dataset], options: SegOptions,
    frame_numbers: Sequence[int | None] | None = None,
) -> hd.seg.Segmentation | None:
    """The label map(s) as one SEG, or None for an empty mask the options skip.

    `sources[k]` is the header of the instance slice `k` of the label map was
    computed on (LoadedSeries.slices order), `frame_numbers[k]` the frame of it
    in a multi-frame instance (None, or no list, for single-frame instances);
    pixel data need not be loaded. Several label maps on the same grid (lungs,
    then the opacities inside them) may overlap: their segments are numbered in
    order (`segment_numbers`) and each is its own binary mask, as BINARY
    segmentations allow (PS3.3 C.8.20.2.3: a pixel may belong to several segments).
    """
    frame_numbers = list(frame_numbers) if frame_numbers is not None else [None] * len(sources)
    maps = [label_maps] if isinstance(label_maps, LabelMap) else list(label_maps)
    for label_map in maps:
        check_source_grid(label_map, sources, frame_numbers)
    arrays = [np.asarray(m.volume.array) for m in maps]
    numbers = [_segment_numbers(m, a) for m, a in zip(maps, arrays)]
    empty = not any(a.any() for a in arrays)
    if empty and options.empty == "skip":
        return None
    array = arrays[0]
    if len(maps) > 1:
        array = np.stack([a == value for a, values in zip(arrays, numbers) for value in values], axis=-1)
    elif not empty and tuple(numbers[0]) != tuple(range(1, len(numbers[0]) + 1)):
        # highdicom wants segment numbers 1..n (PS3.3 C.8.20.2: start at 1, increase by 1).
        lookup = np.zeros(256, dtype=np.uint8)
        for number, value in enumerate(numbers[0], start=1):
            lookup[value] = number
        array = lookup[array]

    headers = source_headers(sources)
    placement = {}
    if any(n is not None for n in frame_numbers):
        # One multi-frame source: highdicom matches each SEG frame to the source frame at its position.
        headers = headers[:1]
        placement["plane_positions"] = [
            hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, source_position(source, number))
            for source, number in zip(sources, frame_numbers)]
    series = options.series
    description = series.series_description + (" (empty)" if empty else "")
    return hd.seg.Segmentation(
        source_images=headers,
        pixel_array=array,
        segmentation_type=options.segmentation_type,
        segment_descriptions=segment_descriptions(maps),
        series_instance_uid=series.seed.series_uid(SEG_KIND),
        series_number=series.series_number,
        sop_instance_uid=series.seed.instance_uid(SEG_KIND),
        instance_number=1,
        manufacturer=series.manufacturer,
        manufacturer_model_name=series.manufacturer_model_name,
        software_versions=series.software_versions,
        device_serial_number=series.device_serial_number,
        content_description=", ".join(dict.fromkeys(_algorithm_text(m.algorithm) for m in maps))[:64],
        content_creator_name=options.content_creator_name,
        transfer_syntax_uid=JPEG2000Lossless if options.compress else ExplicitVRLittleEndian,
        # An all-empty SEG with every frame omitted would have no frames at all.
        omit_empty_frames=options.omit_empty_frames and not empty,
        series_description=description[:64],
        # Serial frame encoding: openjpeg crashed the process (SIGSEGV) when highdicom
        # encoded frames on a thread pool, seen with 40 frames of a real series.
        workers=0,
        **placement,
    )


def warm_up() -> bytes:
    """The Part 10 bytes of the SEG of a made-up two-slice CT, built in memory.

    The first SEG a process builds also loads highdicom's tables of the
    standard's modules (about 0.3 s of JSON parsing on a 2-core VM, a third of
    a 20-slice job's time after inference); a job worker calls this at its
    start, so that no job pays for it. Nothing is written to disk: a worker
    stopped during its start leaves no file behind."""
    from dicom_node.results.segread import source_grid
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    sources = []
    for index in range(2):
        source = pydicom.Dataset()
        source.SOPClassUID, source.SOPInstanceUID = CTImageStorage, generate_uid()
        source.StudyInstanceUID, source.SeriesInstanceUID, source.FrameOfReferenceUID = study, series, frame
        source.Modality = "CT"
        source.Rows = source.Columns = 4
        source.PixelSpacing, source.SliceThickness = [1.0, 1.0], 1.0
        source.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        source.ImagePositionPatient = [0.0, 0.0, float(index)]
        sources.append(source)
    array = np.zeros((2, 4, 4), dtype=np.uint8)
    array[:, 1:3, 1:3] = 1
    organ = Code("123037004", "SCT", "Anatomical Structure")
    label_map = LabelMap(source_grid(sources).with_array(array),
                         (SegmentLabel(1, "warm-up", organ, organ),), Algorithm("warm-up", "0"))
    series_out = OutputSeries(UidSeed(series, 1, "warm-up"), 1, "warm-up")
    buffer = io.BytesIO()
    build_seg(label_map, sources, SegOptions(series_out, compress=False)).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def check_source_grid(label_map: LabelMap, sources: Sequence[pydicom.Dataset],
                      frame_numbers: Sequence[int | None] | None = None) -> None:
    """Refuse to write a SEG whose frames would not lie on their source slices.

    The SEG places frame k by the position of `sources[k]` (of its frame
    `frame_numbers[k]` in a multi-frame source); a label map in another slice
    order or on a resampled grid would then be displayed shifted. The
    tolerance is half a slice: the volume loader accepts slightly uneven
    spacing (and then models the series as evenly spaced), but any frame
    matched to the wrong slice is off by at least one spacing. Results
    reference one multi-frame instance or single-frame instances
    (`volume.check_series` refuses other series before inference).
    """
    volume = label_map.volume
    tolerance_mm = volume.spacing[2] / 2
    k_count, rows, columns = volume.shape
    frame_numbers = list(frame_numbers) if frame_numbers is not None else [None] * len(sources)
    if len(sources) != k_count or len(frame_numbers) != k_count:
        raise SourceGridError(f"label map has {k_count} slices but {len(sources)} source instances were given")
    if any(n is not None for n in frame_numbers) and len({str(s.get("SOPInstanceUID")) for s in sources}) > 1:
        raise SourceGridError("the label map's slices come from more than one instance, one of them multi-frame: "
                              "a SEG references one multi-frame instance or single-frame instances")
    first_axis = volume.index_to_lps(np.array([[0, 0, k] for k in range(k_count)]))
    for k, (source, number) in enumerate(zip(sources, frame_numbers)):
        uid = source.get("SOPInstanceUID", "?") + (f" frame {number}" if number is not None else "")
        position = source_position(source, number)
        if position is None:
            raise SourceGridError(f"source instance {uid} has no Image Position (Patient)")
        if (int(source.Rows), int(source.Columns)) != (rows, columns):
            raise SourceGridError(
                f"source instance {uid} is {source.Rows}x{source.Columns}, the label map slice is {rows}x{columns}"
            )
        position = np.array(position)
        if np.abs(position - first_axis[k]).max() > tolerance_mm:
            raise SourceGridError(
                f"source instance {uid} is at {position.round(3).tolist()} mm but label map slice {k} "
                f"is at {first_axis[k].round(3).tolist()} mm"
            )


def source_position(source: pydicom.Dataset, frame_number: int | None) -> list[float] | None:
    """Image Position (Patient) of a single-frame source, or of frame `frame_number` of a multi-frame one
    (Plane Position functional group, per frame or shared: PS3.3 C.7.6.16.2.3)."""
    value = source.get("ImagePositionPatient")
    if frame_number is not None:
        per_frame = source.get("PerFrameFunctionalGroupsSequence") or []
        shared = source.get("SharedFunctionalGroupsSequence") or []
        groups = [per_frame[frame_number - 1]] if frame_number <= len(per_frame) else []
        for group in [*groups, *shared[:1]]:
            items = group.get("PlanePositionSequence")
            if items and "ImagePositionPatient" in items[0]:
                value = items[0].ImagePositionPatient
                break
    return None if value is None or len(value) != 3 else [float(v) for v in value]


def _segment_numbers(label_map: LabelMap, array: np.ndarray) -> list[int]:
    """Label values in segment order; every value present in the array must be described.

    Cheap on 80 M voxels: when the values are 1..n a max() proves it, else one
    table lookup (no histogram: bincount widens uint8 to int64, 0.5 s here).
    """
    values = [segment.value for segment in label_map.segments]
    if len(set(values)) != len(values) or not all(0 < v < 256 for v in values):
        raise ValueError(f"segment label values must be distinct and within 1..255, got {values}")
    highest = int(array.max()) if array.size else 0
    if sorted(values) == list(range(1, len(values) + 1)) and highest <= len(values):
        return values
    described = np.zeros(256, dtype=bool)
    described[[0, *values]] = True
    undescribed = np.unique(array[~described[array]])
    if undescribed.size:
        raise ValueError(f"label map holds values {undescribed.tolist()} that no SegmentLabel describes")
    return values


def segment_numbers(label_maps: Sequence[LabelMap]) -> list[list[int]]:
    """The SEG's Segment Number of each segment of each label map: 1..n across the maps, in order."""
    numbers, start = [], 1
    for label_map in label_maps:
        numbers.append(list(range(start, start + len(label_map.segments))))
        start += len(label_map.segments)
    return numbers


def segment_descriptions(label_maps: LabelMap | Sequence[LabelMap]) -> list[hd.seg.SegmentDescription]:
    maps = [label_maps] if isinstance(label_maps, LabelMap) else list(label_maps)
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=segment.name[:64],
            segmented_property_category=coded(segment.category),
            segmented_property_type=coded(segment.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_identification(label_map.algorithm),
        )
        for label_map, numbers in zip(maps, segment_numbers(maps))
        for number, segment in zip(numbers, label_map.segments)
    ]


def coded(code: Code) -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def algorithm_identification(algorithm: Algorithm) -> hd.AlgorithmIdentificationSequence:
    """PS3.3 C.8.20.2 Algorithm Identification: name, version, family (and source) of the model."""
    return hd.AlgorithmIdentificationSequence(
        name=algorithm.name[:64],
        family=coded(algorithm.family),
        version=algorithm.version[:64],
        source=algorithm.source[:64] or None,
    )


def _algorithm_text(algorithm: Algorithm) -> str:
    return f"{algorithm.name} {algorithm.version}".strip()

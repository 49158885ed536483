"""One inference request of the HTTP API (dicom_node.ops.infer_api), run in a job worker process.

A viewer sends a volume, not a series the node received: a NIfTI file, or the
files of one DICOM series. The worker runs the pipeline's steps on it exactly as
a job does (`dicom_node.pipeline.job.run_steps`, the same models and versions)
and writes what the request asked for into its folder: the label map as NIfTI on
the input's own grid, and for DICOM input the SEG a job would write
(`dicom_node.results.outputs`, its UIDs new for each request, so it never
collides with the SEG the node sent to the PACS for the same series). The
measurements (segment volumes, lung involvement figures, class probabilities,
each step's outcome) come back as a plain dict.

Like `job`, this touches neither the journal nor the metrics.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from dicom_node.config import Config
from dicom_node.config.pipelines import PipelineConfig
from dicom_node.states import StepState
from dicom_node.store.journal import StepOutcome

MASK_NAME = "mask.nii.gz"


class InputUnusable(ValueError):
    """The uploaded volume cannot be fed to a pipeline (not 3-D, several components, unreadable)."""


@dataclass(frozen=True)
class InferRequest:
    config: Config
    target: str  # the pipeline's or the model's name, as the request named it
    pipeline: PipelineConfig  # what runs: the named pipeline, or one step of the named model
    position: int  # the pipeline's place in `pipelines` (its SEG's SeriesNumber); one past them for a model
    request_id: str  # unique per request: seeds the SEG's UIDs
    nifti: str | None  # the uploaded NIfTI file, or None for DICOM input
    dicom_files: tuple[str, ...]  # the files of the uploaded series (empty for NIfTI input)
    out_dir: str
    seg: bool  # also write the DICOM SEG (DICOM input only)


@dataclass(frozen=True)
class InferOutput:
    mask: str | None  # NIfTI label map (uint8, 0 = background) on the input's grid; None: no step segments
    seg: str | None  # the DICOM SEG, when asked for and the mask is not empty
    measurements: dict
    steps: tuple[StepOutcome, ...]
    seconds: float


def produce(request: InferRequest) -> InferOutput:
    """Read the volume, run the steps, write the mask (and the SEG); raises InputUnusable, or
    SeriesGeometryError for a DICOM series that makes no volume (as a job's load does)."""
    import SimpleITK as sitk

    from dicom_node.pipeline.job import run_steps, source_headers
    started = time.monotonic()
    loaded = None
    if request.nifti is not None:
        volume = read_nifti(Path(request.nifti))
    else:
        from dicom_node.pipeline.volume import load_series
        loaded = load_series([Path(p) for p in request.dicom_files])
        volume = loaded.volume
    ran = run_steps(request.config, request.pipeline, volume, f"inference request {request.request_id} "
                                                              f"({request.target})")
    if not any(outcome.state == StepState.OK for outcome in ran.outcomes):
        reasons = "; ".join(str(outcome) for outcome in ran.outcomes)
        raise RuntimeError(f"no step of {request.target} gave a result: {reasons}")
    out_dir = Path(request.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label_map = list(ran.masks.values())[-1] if ran.masks else None
    mask = seg = None
    if label_map is not None:
        mask = out_dir / MASK_NAME
        sitk.WriteImage(label_map.volume.to_sitk(), str(mask), useCompression=True)
    if request.seg and loaded is not None and label_map is not None:
        from dicom_node.results.outputs import Produced, write_outputs
        sources, frame_numbers = source_headers(loaded)
        produced = Produced(request.config.results, str(sources[0].SeriesInstanceUID), 1,
                            f"{request.target}/infer/{request.request_id}", request.position, label_map,
                            ran.probabilities, ran.involvements, ran.outcomes, sources, frame_numbers, volume,
                            out_dir)
        seg = next(iter(write_outputs(["seg"], produced)), None)
    return InferOutput(str(mask) if mask else None, str(seg) if seg else None,
                       measurements(ran, volume.spacing), ran.outcomes, time.monotonic() - started)


def nifti_voxels(path: Path) -> int:
    """The voxel count of a NIfTI volume the pipeline can take, from its header alone (the API checks an
    upload with this before a worker allocates what the header declares); InputUnusable otherwise."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputUnusable(f"not a readable NIfTI volume: {str(error).strip().splitlines()[-1]}") from None
    size = reader.GetSize()
    if reader.GetDimension() != 3 or min(size) < 2:
        raise InputUnusable(f"a NIfTI volume must be 3-D with 2 or more voxels along each axis; this one is "
                            f"{reader.GetDimension()}-D, size {list(size)}")
    if reader.GetNumberOfComponents() != 1:
        raise InputUnusable(f"a NIfTI volume must have one value per voxel (Hounsfield units); this one has "
                            f"{reader.GetNumberOfComponents()}")
    return size[0] * size[1] * size[2]


def read_nifti(path: Path):
    """The NIfTI volume as the pipeline's Volume (SimpleITK maps NIfTI's RAS to DICOM's LPS)."""
    import SimpleITK as sitk

    from inference.volume import Volume
    nifti_voxels(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise InputUnusable(f"not a readable NIfTI volume: {str(error).strip().splitlines()[-1]}") from None
    return Volume.from_sitk(image)


def measurements(ran, spacing: tuple[float, float, float]) -> dict:
    """What a viewer shows beside the mask: each segment's voxel count and volume (mL), the lung
    involvement figures and class probabilities the SR would carry, and each step's outcome."""
    import numpy as np

    voxel_ml = float(np.prod(spacing)) / 1000.0
    segments = []
    for step, label_map in ran.masks.items():
        counts = np.bincount(label_map.volume.array.ravel(), minlength=256)
        for segment in label_map.segments:
            segments.append({"step": step, "label": segment.value, "name": segment.name,
                             "voxels": int(counts[segment.value]),
                             "volume_ml": round(int(counts[segment.value]) * voxel_ml, 3),
                             "algorithm": {"name": label_map.algorithm.name, "version": label_map.algorithm.version}})
    return {
        "segments": segments,
        "lung_involvement": [result.as_json() for result in ran.involvements],
        "classifications": [{"finding": result.winner.name,
                             "classes": [{"name": label.name, "probability": float(probability)}
                                         for label, probability in zip(result.classes, result.probabilities)]}
                            for result in ran.probabilities],
        "steps": [{**asdict(outcome), "state": str(outcome.state)} for outcome in ran.outcomes],
    }

"""The job's one TID 1500 Measurement Report (Comprehensive SR), plus a JSON copy.

A radiologist and a reporting system read what a job found as one document
(PS3.16 TID 1500), whose groups come from the steps that ran:

- each lung involvement step's volumetric ROI groups, referencing the SEG's
  lung segments (`measurements.involvement_groups`);
- each classifier's groups (TID 1501), one per class: Probability (122157,
  DCM), a NUM in UCUM "1", 0..1; Finding type = the class's code, Tracking
  Identifier = the class name; Algorithm Identification (TID 4019); and,
  in the winning class's group only, Conclusion (121077, DCM) = the class's
  code, the coded finding a PACS user reads (not "Finding" 121071: TID 1501
  already names the finding type so);
- in the Qualitative Evaluations container (C0034375, UMLS), Comments
  (121106, DCM) as TEXT: the involvement disclaimer (quantification, not a
  diagnosis), then one per step saying it completed, did not run or was
  skipped, and why, so a reader sees that a classifier was not installed
  beside whatever the other steps measured.

A job whose steps all completed and gave no measurement (a segmentation
pipeline) has nothing to report beyond its SEG: no SR is written.

Comprehensive SR, not Comprehensive 3D SR: the report has no SCOORD3D (the
regions are the SEG's segments), and more archives accept the older class.
The source series is referenced twice, as the standard has it: every source
instance in the Image Library (TID 1600) and in the Current Requested
Procedure Evidence Sequence (PS3.3 C.17.2), with the SEG the groups reference;
a multi-frame source (Enhanced CT) is in the evidence only, because
highdicom's Image Library entry describes one plane (TID 1604 descriptors from
top-level Image Position/Orientation (Patient) and Pixel Spacing, which a
multi-frame instance keeps per frame). Classes whose model gives no code get a
local code in the private scheme 99DCMNODE (PS3.16 8.2: "99" prefix).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from dicom_node.store.journal import StepOutcome
from dicom_node.results import LOCAL_SCHEME, OutputSeries, save_dataset, source_headers, write_atomically
from dicom_node.results.measurements import CT_OF_CHEST, involvement_comment, involvement_groups
from dicom_node.results.seg import coded
from dicom_node.states import StepState
from inference.involvement import LungInvolvement
from inference.results import ClassLabel, ClassProbabilities, Code

SR_KIND = "sr"
PROBABILITY = Code("122157", "DCM", "Probability")
CONCLUSION = Code("121077", "DCM", "Conclusion")
UNITLESS = Code("1", "UCUM", "no units")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = Code("121106", "DCM", "Comment")
STEP_STATE_TEXT = {StepState.OK: "completed", StepState.FAILED: "not run", StepState.SKIPPED: "skipped"}


@dataclass(frozen=True)
class SrOptions:
    series: OutputSeries


@dataclass(frozen=True)
class ReportContent:
    """What the job's steps give the report: how each went, each classifier's and involvement step's result."""

    steps: Sequence[StepOutcome] = ()
    classifications: Sequence[ClassProbabilities] = ()
    involvements: Sequence[LungInvolvement] = ()

    @property
    def worth_a_report(self) -> bool:
        """Something beyond "every step completed" to say (see the module docstring)."""
        return bool(self.classifications or self.involvements
                    or any(step.state != StepState.OK for step in self.steps))


def class_code(label: ClassLabel) -> Code:
    """The class's own code, else a local one named after it."""
    return label.code or Code(label.name, LOCAL_SCHEME, label.name)


def step_outcome_text(outcome: StepOutcome) -> str:
    """The sentence the SR holds for one step (TEXT values may be 10240 characters, PS3.5 6.2 UT)."""
    text = f"Step {outcome.step}: {STEP_STATE_TEXT[outcome.state]}"
    return (f"{text}: {outcome.reason}" if outcome.reason else text)[:10240]


def write_report(content: ReportContent, sources: Sequence[pydicom.Dataset], out_dir: Path, options: SrOptions,
                 seg_path: Path | None = None) -> Path | None:
    """Write the SR and `<same name>.json` in `out_dir`; returns the SR's path, None when the job has nothing
    to report (`ReportContent.worth_a_report`). `seg_path`: the job's SEG, whose segments the involvement
    groups reference.

    Each source instance is referenced once, a multi-frame one too (its header is the source of every slice).
    """
    if not content.worth_a_report:
        return None
    headers = list({str(h.SOPInstanceUID): h for h in source_headers(sources)}.values())
    series = options.series
    seed = series.seed
    # The SEG is evidence only where groups reference its segments: an involvement step found lungs.
    measured = seg_path is not None and any(result.lungs for result in content.involvements)
    seg = pydicom.dcmread(seg_path, stop_before_pixels=True) if measured else None
    tracking_uids = (seed.instance_uid(f"{SR_KIND}-tracking", index) for index in itertools.count())
    groups = [group for result in content.involvements
              for group in involvement_groups(result, seg, str(headers[0].SeriesInstanceUID), tracking_uids)]
    groups += [group for result in content.classifications for group in _probability_groups(result, tracking_uids)]
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(series),
        procedure_reported=coded(CT_OF_CHEST if content.involvements else IMAGING_PROCEDURE),
        # highdicom builds TID 1500 only with an Imaging Measurements container; with no group it is built
        # around a placeholder and removed (row 6 is MC: Imaging Measurements or Qualitative Evaluations).
        imaging_measurements=groups or [hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=next(tracking_uids), identifier="none"))],
        referenced_images=[h for h in headers if "PerFrameFunctionalGroupsSequence" not in h] or None,
    )
    if not groups:
        report[0].ContentSequence = hd.sr.ContentSequence(
            [item for item in report[0].ContentSequence
             if item.ConceptNameCodeSequence[0].CodeValue != codes.DCM.ImagingMeasurements.value],
            is_root=False)
    comments = [involvement_comment(result) for result in content.involvements]
    comments += [step_outcome_text(outcome) for outcome in content.steps]
    if comments:
        report[0].ContentSequence.append(_evaluations(comments))
    document = hd.sr.ComprehensiveSR(
        evidence=[*headers, *([seg] if seg is not None else [])],
        content=report,
        series_instance_uid=seed.series_uid(SR_KIND),
        series_number=series.series_number,
        sop_instance_uid=seed.instance_uid(SR_KIND),
        instance_number=1,
        manufacturer=series.manufacturer,
        is_complete=True,
        series_description=series.series_description[:64],
    )
    document.ManufacturerModelName = series.manufacturer_model_name[:64]
    document.SoftwareVersions = series.software_versions[:64]
    document.DeviceSerialNumber = series.device_serial_number[:64]
    path = save_dataset(document, out_dir / f"SR_{document.SOPInstanceUID}.dcm")
    summary = {
        "sop_instance_uid": str(document.SOPInstanceUID),
        "series_instance_uid": str(document.SeriesInstanceUID),
        "study_instance_uid": str(document.StudyInstanceUID),
        "source_series_instance_uid": str(headers[0].SeriesInstanceUID),
        "source_sop_instance_uids": [str(h.SOPInstanceUID) for h in headers],
        "referenced_seg_sop_instance_uid": str(seg.SOPInstanceUID) if seg is not None else None,
        "steps": [{"step": o.step, "state": o.state, "reason": o.reason} for o in content.steps],
        "classifications": [_classification_json(result) for result in content.classifications],
        "lung_involvement": [result.as_json() for result in content.involvements],
    }
    text = json.dumps(summary, indent=2) + "\n"
    write_atomically(path.with_suffix(".json"), lambda handle: handle.write(text.encode()))
    return path


def _evaluations(comments: Sequence[str]) -> hd.sr.ContainerContentItem:
    """TID 1500's Qualitative Evaluations container with one Comment per line (see the module docstring)."""
    container = hd.sr.ContainerContentItem(name=coded(QUALITATIVE_EVALUATIONS),
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=coded(COMMENT), value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for text in comments])
    return container


def _probability_groups(result: ClassProbabilities, tracking_uids: Iterator[str]) -> list:
    """One Measurement Group per class of one classifier (see the module docstring)."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.algorithm.name[:64],
        version=result.algorithm.version[:64],
        family=coded(result.algorithm.family),
    )
    return [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=next(tracking_uids), identifier=label.name[:64]),
            finding_type=coded(class_code(label)),
            algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(
                    name=coded(PROBABILITY), value=float(probability), unit=coded(UNITLESS), algorithm_id=algorithm
                )
            ],
            qualitative_evaluations=(
                [hd.sr.QualitativeEvaluation(name=coded(CONCLUSION), value=coded(class_code(label)))]
                if label is result.winner
                else None
            ),
        )
        for label, probability in zip(result.classes, result.probabilities)
    ]


def _classification_json(result: ClassProbabilities) -> dict:
    return {
        "algorithm": {"name": result.algorithm.name, "version": result.algorithm.version},
        "finding": {"name": result.winner.name, "code": _code_json(class_code(result.winner))},
        "classes": [{"name": label.name, "code": _code_json(class_code(label)), "probability": float(probability)}
                    for label, probability in zip(result.classes, result.probabilities)],
    }


def observation_context(series: OutputSeries) -> hd.sr.ObservationContext:
    """The node as the observing device (TID 1004): a reader sees which equipment made the report."""
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=series.seed.instance_uid(f"{SR_KIND}-device"),
                name=series.manufacturer_model_name[:64],
                manufacturer_name=series.manufacturer[:64],
                model_name=series.manufacturer_model_name[:64],
                serial_number=series.device_serial_number[:64],
            ),
        )
    )


def _code_json(code: Code) -> dict[str, str]:
    return {"value": code.value, "scheme": code.scheme, "meaning": code.meaning}

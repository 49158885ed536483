"""Class probabilities as a DICOM Comprehensive SR (TID 1500 Measurement Report), plus a JSON copy.

Content tree (PS3.16 TID 1500 / TID 1501), one Measurement Group per class:

- Conclusion (121077, DCM) = the class's code, a qualitative evaluation present
  only in the winning class's group: the coded finding a PACS user reads
  (not "Finding" 121071: TID 1501 already names the finding type so);
- Probability (122157, DCM), a NUM in UCUM "1" (dimensionless), 0..1;
- Finding type = the class's code, Tracking Identifier = the class name;
- Algorithm Identification (TID 4019): name, version of the classifier.

The source series is referenced twice, as the standard has it: every source
instance in the Image Library (TID 1600) and in the Current Requested
Procedure Evidence Sequence (PS3.3 C.17.2); a multi-frame source (Enhanced CT)
is in the evidence only, because highdicom's Image Library entry describes one
plane (TID 1604 descriptors from top-level Image Position/Orientation (Patient)
and Pixel Spacing, which a multi-frame instance keeps per frame). Classes whose
model gives no code get a local code in the private scheme 99DCMNODE (PS3.16
8.2: "99" prefix).

How each step of the job went is one TEXT item per step (Comment, 121106 DCM)
in TID 1500's Qualitative Evaluations container (C0034375, UMLS): a reader
sees that a classifier was not installed, or that a step was skipped because
the step it needs failed, beside whatever the other steps measured.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.sr.codedict import codes

from dicom_node.results import OutputSeries, save_dataset, source_headers, write_atomically
from dicom_node.results.uids import UidSeed
from dicom_node.results.seg import coded
from dicom_node.store.journal import StepOutcome
from dicom_node.states import StepState
from inference.results import Algorithm, ClassLabel, ClassProbabilities, Code

SR_KIND = "sr"
LOCAL_SCHEME = "99DCMNODE"
PROBABILITY = Code("122157", "DCM", "Probability")
CONCLUSION = Code("121077", "DCM", "Conclusion")
UNITLESS = Code("1", "UCUM", "no units")
IMAGING_PROCEDURE = Code("363679005", "SCT", "Imaging procedure")
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
COMMENT = Code("121106", "DCM", "Comment")
# highdicom builds TID 1500 only with an Imaging Measurements container; a report with no classifier
# output is built with this one and the container removed.
PLACEHOLDER = ClassProbabilities((ClassLabel("none"),), (1.0,), Algorithm("none", "0"))
STEP_STATE_TEXT = {StepState.OK: "completed", StepState.FAILED: "not run", StepState.SKIPPED: "skipped"}


@dataclass(frozen=True)
class SrOptions:
    series: OutputSeries


def class_code(label: ClassLabel) -> Code:
    """The class's own code, else a local one named after it."""
    return label.code or Code(label.name, LOCAL_SCHEME, label.name)


def step_outcome_text(outcome: StepOutcome) -> str:
    """The sentence the SR holds for one step (TEXT values may be 10240 characters, PS3.5 6.2 UT)."""
    text = f"Step {outcome.step}: {STEP_STATE_TEXT[outcome.state]}"
    return (f"{text}: {outcome.reason}" if outcome.reason else text)[:10240]


def step_outcomes_container(steps: Sequence[StepOutcome]) -> hd.sr.ContainerContentItem:
    """TID 1500's Qualitative Evaluations container with one Comment per step (see the module docstring)."""
    container = hd.sr.ContainerContentItem(name=coded(QUALITATIVE_EVALUATIONS),
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    container.ContentSequence = hd.sr.ContentSequence([
        hd.sr.TextContentItem(name=coded(COMMENT), value=step_outcome_text(outcome),
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
        for outcome in steps])
    return container


def write_classification_sr(
    result: ClassProbabilities | None, sources: Sequence[pydicom.Dataset], out_dir: Path, options: SrOptions,
    steps: Sequence[StepOutcome] = (),
) -> Path:
    """Write the SR and `<same name>.json` in `out_dir`; returns the SR's path. `result` is None when
    the job has no classifier output (its classifier did not run): the SR then reports the steps.

    Each source instance is referenced once, a multi-frame one too (its header is the source of every slice).
    """
    headers = list({str(h.SOPInstanceUID): h for h in source_headers(sources)}.values())
    series = options.series
    seed = series.seed
    report = hd.sr.MeasurementReport(
        observation_context=observation_context(series, SR_KIND),
        procedure_reported=coded(IMAGING_PROCEDURE),
        imaging_measurements=_probability_groups(result or PLACEHOLDER, seed),
        referenced_images=[h for h in headers if "PerFrameFunctionalGroupsSequence" not in h] or None,
    )
    if result is None:  # TID 1500 row 6 is MC: Imaging Measurements or Qualitative Evaluations, one of them
        report[0].ContentSequence = hd.sr.ContentSequence(
            [item for item in report[0].ContentSequence
             if item.ConceptNameCodeSequence[0].CodeValue != codes.DCM.ImagingMeasurements.value],
            is_root=False)
    if steps or result is None:
        report[0].ContentSequence.append(step_outcomes_container(steps))
    document = hd.sr.ComprehensiveSR(
        evidence=headers,
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
        "steps": [{"step": o.step, "state": o.state, "reason": o.reason} for o in steps],
    }
    if result is not None:
        summary.update({
            "algorithm": {"name": result.algorithm.name, "version": result.algorithm.version},
            "finding": {"name": result.winner.name, "code": _code_json(class_code(result.winner))},
            "classes": [
                {"name": label.name, "code": _code_json(class_code(label)), "probability": float(probability)}
                for label, probability in zip(result.classes, result.probabilities)
            ],
        })
    text = json.dumps(summary, indent=2) + "\n"
    write_atomically(path.with_suffix(".json"), lambda handle: handle.write(text.encode()))
    return path


def _probability_groups(result: ClassProbabilities, seed: UidSeed) -> list:
    """One Measurement Group per class (see the module docstring)."""
    algorithm = hd.sr.AlgorithmIdentification(
        name=result.algorithm.name[:64],
        version=result.algorithm.version[:64],
        family=coded(result.algorithm.family),
    )
    winner = result.winner
    return [
        hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=seed.instance_uid(f"{SR_KIND}-tracking", index), identifier=label.name[:64]
            ),
            finding_type=coded(class_code(label)),
            algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(
                    name=coded(PROBABILITY), value=float(probability), unit=coded(UNITLESS), algorithm_id=algorithm
                )
            ],
            qualitative_evaluations=(
                [hd.sr.QualitativeEvaluation(name=coded(CONCLUSION), value=coded(class_code(label)))]
                if label is winner
                else None
            ),
        )
        for index, (label, probability) in enumerate(zip(result.classes, result.probabilities))
    ]


def observation_context(series: OutputSeries, kind: str) -> hd.sr.ObservationContext:
    """The node as the observing device (TID 1004): a reader sees which equipment made the report."""
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device,
            observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                uid=series.seed.instance_uid(f"{kind}-device"),
                name=series.manufacturer_model_name[:64],
                manufacturer_name=series.manufacturer[:64],
                model_name=series.manufacturer_model_name[:64],
                serial_number=series.device_serial_number[:64],
            ),
        )
    )


def _code_json(code: Code) -> dict[str, str]:
    return {"value": code.value, "scheme": code.scheme, "meaning": code.meaning}

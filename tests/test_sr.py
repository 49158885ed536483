"""The job's measurement report with classifier probabilities and step outcomes: dciodvfy clean, and highdicom
parses back the same probabilities."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import pytest

from dicom_node.results import LOCAL_SCHEME, OutputSeries
from dicom_node.results.sr import ReportContent, SrOptions, write_report
from dicom_node.results.uids import UidSeed
from inference.results import Algorithm, ClassLabel, ClassProbabilities, Code
from dicom_node.store.journal import StepOutcome
from tests.peers import dciodvfy, dcmtk
from tests.test_seg import real_sources

pytestmark = dciodvfy.required()

RESULT = ClassProbabilities(
    classes=(
        ClassLabel("normal", Code("17621005", "SCT", "Normal")),
        ClassLabel("splenomegaly", Code("16294009", "SCT", "Splenomegaly")),
        ClassLabel("uncertain"),
    ),
    probabilities=(0.125, 0.8, 0.075),
    algorithm=Algorithm("spleen-size-classifier", "0.3.1"),
)


def sr_options(generation: int = 1) -> SrOptions:
    seed = UidSeed(str(real_sources()[0].SeriesInstanceUID), generation, "abdomen")
    return SrOptions(OutputSeries(seed, series_number=9902, series_description="AI spleen classification"))


def write_classification(result, tmp_path: Path, options: SrOptions, steps=()) -> Path:
    return write_report(ReportContent(steps, (result,) if result is not None else ()), real_sources(), tmp_path,
                        options)


def test_sr_is_valid_and_parses_back_to_the_same_probabilities(tmp_path: Path) -> None:
    sources = real_sources()
    path = write_classification(RESULT, tmp_path, sr_options())
    validation = dciodvfy.validate(path)
    assert validation.errors == [], validation.report()

    sr = hd.sr.srread(path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert sr.StudyInstanceUID == sources[0].StudyInstanceUID
    assert (sr.SeriesNumber, sr.SeriesDescription) == (9902, "AI spleen classification")
    assert sr.SeriesInstanceUID.startswith("2.25.")
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == sources[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in evidence.ReferencedSOPSequence} == {s.SOPInstanceUID for s in sources}

    groups = sr.content.get_image_measurement_groups()
    parsed = {}
    for group in groups:
        (measurement,) = group.get_measurements()
        assert (measurement.name.value, measurement.unit.value) == ("122157", "1")
        # TID 4019 Algorithm Identification under the NUM: Algorithm Name, Algorithm Version.
        assert texts(measurement[0]) >= {"111001": "spleen-size-classifier", "111003": "0.3.1"}.items()
        parsed[group.finding_type.value] = (measurement.value, conclusions(group))
    assert parsed == {
        "17621005": (pytest.approx(0.125), []),
        "16294009": (pytest.approx(0.8), ["16294009"]),  # the winner carries the coded finding
        "uncertain": (pytest.approx(0.075), []),
    }

    summary = json.loads(path.with_suffix(".json").read_text())
    assert summary["sop_instance_uid"] == sr.SOPInstanceUID
    (classification,) = summary["classifications"]
    assert classification["finding"]["code"] == {"value": "16294009", "scheme": "SCT", "meaning": "Splenomegaly"}
    assert [(c["name"], c["probability"]) for c in classification["classes"]] == [
        ("normal", 0.125), ("splenomegaly", 0.8), ("uncertain", 0.075)
    ]
    assert classification["classes"][2]["code"]["scheme"] == LOCAL_SCHEME
    assert summary["lung_involvement"] == [] and summary["referenced_seg_sop_instance_uid"] is None


def conclusions(group) -> list[str]:
    return [e.value.value for e in group.get_qualitative_evaluations() if e.name.value == "121077"]


def texts(item) -> set[tuple[str, str]]:
    """(concept code, text) of every TEXT content item below `item`."""
    found = set()
    for child in item.get("ContentSequence", []):
        if child.ValueType == "TEXT":
            found.add((child.ConceptNameCodeSequence[0].CodeValue, child.TextValue))
        found |= texts(child)
    return found


def test_rerun_writes_the_same_sr_uids(tmp_path: Path) -> None:
    first = hd.sr.srread(write_classification(RESULT, tmp_path / "a", sr_options()))
    again = hd.sr.srread(write_classification(RESULT, tmp_path / "b", sr_options()))
    other = hd.sr.srread(write_classification(RESULT, tmp_path / "c", sr_options(generation=2)))
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (again.SOPInstanceUID, again.SeriesInstanceUID)
    assert first.SOPInstanceUID != other.SOPInstanceUID


STEPS = (StepOutcome("lungs", "ok"),
         StepOutcome("covid", "failed", "model covid19_ct is not installed or not usable: model 'covid19_ct' is not "
                                        "in the model repository models"),
         StepOutcome("report", "skipped", "needs step covid, which did not run"))


def comments(sr) -> list[str]:
    """The Comments (121106 DCM) of the Qualitative Evaluations container (C0034375 UMLS) at the root."""
    (container,) = [item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"]
    return [item.TextValue for item in container.ContentSequence
            if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "121106"]


def step_texts(sr) -> list[str]:
    """The Comments on how each step went."""
    return [text for text in comments(sr) if text.startswith("Step ")]


@pytest.mark.parametrize("result", [None, RESULT], ids=["no classifier output", "with probabilities"])
def test_sr_says_how_each_step_went(tmp_path: Path, result) -> None:
    """A classifier that was not installed leaves an SR that says so (beside the probabilities of one that
    ran): dciodvfy clean, read by highdicom and by dcmtk's dsrdump."""
    path = write_classification(result, tmp_path, sr_options(), STEPS)
    validation = dciodvfy.validate(path)
    assert validation.errors == [], validation.report()
    sr = hd.sr.srread(path)
    assert step_texts(sr) == [
        "Step lungs: completed",
        "Step covid: not run: model covid19_ct is not installed or not usable: model 'covid19_ct' is not in the "
        "model repository models",
        "Step report: skipped: needs step covid, which did not run"]
    assert len(sr.content.get_image_measurement_groups()) == (0 if result is None else 3)
    dump = dcmtk.dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert "Step covid: not run: model covid19_ct is not installed" in dump.stdout
    summary = json.loads(path.with_suffix(".json").read_text())
    assert [s["state"] for s in summary["steps"]] == ["ok", "failed", "skipped"]
    assert len(summary["classifications"]) == (result is not None)
    assert comments(sr) == step_texts(sr)  # no involvement step: no disclaimer


SECOND = ClassProbabilities(
    classes=(ClassLabel("other"), ClassLabel("covid-early"), ClassLabel("covid-advanced")),
    probabilities=(0.2, 0.5, 0.3), algorithm=Algorithm("covid-stage", "1"))


def test_every_classifier_is_in_the_one_report(tmp_path: Path) -> None:
    """Two classifier steps: each one's groups in the same report, with its own algorithm and conclusion, and
    Tracking Unique Identifiers distinct across the report."""
    steps = (StepOutcome("spleen-size", "ok"), StepOutcome("stage", "ok"))
    path = write_report(ReportContent(steps, (RESULT, SECOND)), real_sources(), tmp_path, sr_options())
    validation = dciodvfy.validate(path)
    assert validation.errors == [], validation.report()
    sr = hd.sr.srread(path)
    groups = sr.content.get_image_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["normal", "splenomegaly", "uncertain", "other", "covid-early",
                                                       "covid-advanced"]
    assert len({g.tracking_uid for g in groups}) == 6
    assert [conclusions(g) for g in groups] == [[], ["16294009"], [], [], ["covid-early"], []]
    names = [dict(texts(g.get_measurements()[0][0]))["111001"] for g in groups]
    assert names == ["spleen-size-classifier"] * 3 + ["covid-stage"] * 3
    assert step_texts(sr) == ["Step spleen-size: completed", "Step stage: completed"]
    summary = json.loads(path.with_suffix(".json").read_text())
    assert [c["finding"]["name"] for c in summary["classifications"]] == ["splenomegaly", "covid-early"]


def test_no_report_when_every_step_completed_and_none_measured(tmp_path: Path) -> None:
    """A segmentation pipeline whose steps all went well has nothing to report beyond its SEG."""
    assert write_report(ReportContent((StepOutcome("spleen", "ok"),)), real_sources(), tmp_path, sr_options()) is None
    assert list(tmp_path.iterdir()) == []

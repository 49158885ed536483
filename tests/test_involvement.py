"""Lung involvement on chest phantoms of known truth: bands within 1 point, zone scores exact."""

from __future__ import annotations

import json
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from dicom_node.ops.api import _involvement
from dicom_node.config import Config
from dicom_node.pipeline.job import JobRequest, produce
from dicom_node.store.journal import JobRecord
from dicom_node.states import JobKind, JobState
from dicom_node.results import OutputSeries
from dicom_node.results.keyimage import KeyImageOptions, write_key_images
from dicom_node.store.journal import StepOutcome
from dicom_node.results.seg import SegOptions, write_seg
from dicom_node.results.sr import ReportContent, SrOptions, write_report
from dicom_node.results.uids import UidSeed
from dicom_node.pipeline.volume import load_series

from inference.involvement import (BANDS, CONSOLIDATION, DISCLAIMER, GROUND_GLASS, ZONES, category,
                                   quantify_involvement, zone_score)
from inference.lung import segment_lungs_classical
from inference.parameters import InvolvementParameters
from tests.chest_phantoms import (CONSOLIDATION as CONSOLIDATION_HU, EMPHYSEMA, GROUND_GLASS as GROUND_GLASS_HU,
                                  Lesion, chest_case, true_percent, true_zone)
from tests.peers import dciodvfy, dcmtk
from tests.phantoms import write_ct_volume
from tests.test_sr import comments

LESIONS = (
    Lesion("right", "upper", GROUND_GLASS_HU),                       # a 12 mm sphere: a few percent
    Lesion("right", "lower", EMPHYSEMA, radius_mm=10.0),
    Lesion("left", "middle", CONSOLIDATION_HU, radius_mm=14.0),
    Lesion("left", "lower", GROUND_GLASS_HU, posterior_y_mm=20.0),  # the posterior ~35 % of the zone
    Lesion("left", "upper", GROUND_GLASS_HU, posterior_y_mm=0.0),   # ~55 %
    Lesion("right", "middle", GROUND_GLASS_HU, posterior_y_mm=-40.0),  # ~85 %
)


@pytest.fixture(scope="module")
def case():
    return chest_case(LESIONS)


@pytest.fixture(scope="module")
def result(case):
    return quantify_involvement(case.volume, segment_lungs_classical(case.volume))


def bands_truth(case, region) -> dict[str, float]:
    p = InvolvementParameters()
    edges = (p.emphysema_hu, p.normal_hu, p.ground_glass_hu, p.consolidation_hu)
    return {name: true_percent(case, region, *edge) for name, edge in zip(BANDS, edges)}


def truth_score(case, region) -> int:
    truth = bands_truth(case, region)
    return zone_score(truth["ground_glass"] + truth["consolidation"])


def test_every_band_within_one_point_per_lung_and_zone(case, result):
    assert [r.name for r in result.lungs] == ["right lung", "left lung"]
    assert [r.name for r in result.zones] == [f"{s} {z} zone" for s in ("right", "left") for z in ZONES]
    for side, lung, zones in (("right", result.lungs[0], result.zones[:3]), ("left", result.lungs[1], result.zones[3:])):
        truth_lung = case.right_lung if side == "right" else case.left_lung
        for region, truth in ((lung, truth_lung), *zip(zones, true_zone(case, side))):
            expected = bands_truth(case, truth)
            measured = {b.band: b.percent for b in region.bands}
            for band in BANDS:
                assert measured[band] == pytest.approx(expected[band], abs=1.0), (region.name, band)
            assert region.opacity_percent == pytest.approx(expected["ground_glass"] + expected["consolidation"], abs=1.0)
            assert region.high_opacity_percent == pytest.approx(expected["consolidation"], abs=1.0)
        assert lung.volume_ml == pytest.approx(np.count_nonzero(truth_lung) * 0.025, rel=0.05)


def test_zone_scores_and_total_are_exact(case, result):
    expected = [truth_score(case, zone) for side in ("right", "left") for zone in true_zone(case, side)]
    assert sorted(expected) == [0, 1, 1, 2, 3, 4]  # every step of the scale
    assert [z.score for z in result.zones] == expected
    assert result.total_score == sum(expected)
    assert result.category == category(sum(expected), InvolvementParameters())
    assert result.complete


def test_opacity_label_map_marks_the_lesions(case, result):
    labels = result.opacities.volume.array
    assert result.opacities.volume.same_grid(case.volume)
    assert [s.name for s in result.opacities.segments] == [GROUND_GLASS.name, CONSOLIDATION.name]
    for value, hu in ((GROUND_GLASS.value, GROUND_GLASS_HU), (CONSOLIDATION.value, CONSOLIDATION_HU)):
        truth = (case.material == hu) & (case.right_lung | case.left_lung)
        found = labels == value
        assert 2 * np.count_nonzero(found & truth) / (np.count_nonzero(found) + np.count_nonzero(truth)) > 0.95
    assert not labels[case.vessels].any()  # vessels are not disease


def test_mean_density_and_json_say_quantification_not_diagnosis(case, result):
    right = result.lungs[0]
    parenchyma = case.right_lung & ~case.vessels
    assert right.mean_hu == pytest.approx(float(case.volume.array[parenchyma].mean()), abs=5.0)
    document = json.loads(json.dumps(result.as_json()))
    assert document["disclaimer"] == DISCLAIMER and "not a diagnosis" in DISCLAIMER
    assert document["total_score"] == result.total_score and document["max_score"] == 24
    assert document["zones"][0]["bands"]["ground_glass"]["low_hu"] == -700.0


def test_vessels_counted_when_asked_add_to_consolidation(case):
    lungs = segment_lungs_classical(case.volume)
    counted = quantify_involvement(case.volume, lungs, InvolvementParameters(vessels="count"))
    excluded = quantify_involvement(case.volume, lungs)
    assert counted.lungs[0].vessel_ml == 0 and excluded.lungs[0].vessel_ml > 1.0
    assert counted.lungs[0].high_opacity_percent > excluded.lungs[0].high_opacity_percent


def test_one_lung_only_scores_its_three_zones():
    case = chest_case((Lesion("left", "lower", GROUND_GLASS_HU, posterior_y_mm=0.0),), lungs=("left",))
    result = quantify_involvement(case.volume, segment_lungs_classical(case.volume))
    assert [r.name for r in result.lungs] == ["left lung"] and not result.complete
    assert [z.score for z in result.zones] == [truth_score(case, z) for z in true_zone(case, "left")]
    assert result.as_json()["max_score"] == 12


@pytest.mark.parametrize(("percent", "score"), [(0.0, 0), (0.01, 1), (24.9, 1), (25.0, 2), (50.0, 3), (74.9, 3),
                                                (75.0, 4), (100.0, 4)])
def test_zone_score_steps(percent, score):
    assert zone_score(percent) == score


def test_options_are_validated():
    assert InvolvementParameters.from_options({"ground_glass_hu": [-700, -250], "consolidation_hu": [-250, 50]}
                                              ).ground_glass_hu == (-700.0, -250.0)
    with pytest.raises(ValueError, match="overlap"):
        InvolvementParameters.from_options({"ground_glass_hu": [-700, -200]})
    with pytest.raises(ValueError, match="unknown option"):
        InvolvementParameters.from_options({"ggo": [-700, -300]})
    with pytest.raises(ValueError, match="exclude or count"):
        InvolvementParameters.from_options({"vessels": "drop"})


@pytest.mark.skipif(not (dciodvfy.available() and dcmtk.available()), reason="dciodvfy and dcmtk needed")
def test_seg_and_measurement_report_are_valid_and_read_back(tmp_path, case, result):
    """SEG with right lung, left lung, ground-glass, consolidation; TID 1500 SR referencing its segments."""
    lungs = segment_lungs_classical(case.volume)
    loaded = load_series(write_ct_volume(case.volume, tmp_path / "ct"))
    assert loaded.volume.same_grid(case.volume)
    sources = [pydicom.dcmread(s.path, stop_before_pixels=True) for s in loaded.slices]
    seed = UidSeed(str(sources[0].SeriesInstanceUID), 1, "chest_ct")
    seg_path = write_seg([lungs, result.opacities], sources, tmp_path / "out",
                         SegOptions(OutputSeries(seed, 9901, "AI chest_ct"), compress=False))
    steps = (StepOutcome("lungs", "ok"), StepOutcome("involvement", "ok"))
    sr_path = write_report(ReportContent(steps, involvements=(result,)), sources, tmp_path / "out",
                           SrOptions(OutputSeries(seed, 9902, "AI chest_ct")), seg_path)
    for path in (seg_path, sr_path):
        validation = dciodvfy.validate(path)
        assert validation.errors == [], validation.report()

    seg = hd.seg.segread(seg_path)
    described = {int(s.SegmentNumber): (s.SegmentLabel, s.SegmentedPropertyTypeCodeSequence[0].CodeValue)
                 for s in seg.SegmentSequence}
    assert described == {1: ("Right lung", "3341006"), 2: ("Left lung", "44029006"),
                         3: ("Ground-glass opacity", "112120"), 4: ("Consolidation", "95436008")}
    pixels = seg.get_volume(combine_segments=False).array  # (k, j, i, segment), in the sources' slice order
    ggo_voxels = np.count_nonzero(result.opacities.volume.array == GROUND_GLASS.value)
    assert np.count_nonzero(pixels[..., 2]) == ggo_voxels
    assert np.count_nonzero(pixels[..., 0] & pixels[..., 2]) > 0  # opacities lie inside the lung segments

    sr = hd.sr.srread(sr_path)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
    assert comments(sr) == [DISCLAIMER, "Step lungs: completed", "Step involvement: completed"]
    (procedure,) = [i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure.ConceptCodeSequence[0].CodeValue == "169069000"  # Procedure reported: CT of chest
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert seg.SOPInstanceUID in {i.ReferencedSOPInstanceUID for s in evidence for i in s.ReferencedSOPSequence}
    groups = sr.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [r.name for r in (*result.lungs, *result.zones)]
    for group, region in zip(groups, (*result.lungs, *result.zones)):
        reference = group.referenced_segment
        assert reference.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert reference.referenced_segment_numbers == [region.lung.value]
        values = {m.name.value: m.value for m in group.get_measurements()}
        assert values["118565006"] == pytest.approx(region.volume_ml, abs=1e-3)
        assert values["ggo-pct"] == pytest.approx(region.bands[2].percent, abs=1e-3)
        assert values["opacity-pct"] == pytest.approx(region.opacity_percent, abs=1e-3)
        if region.score is not None:
            assert values["zone-score"] == region.score
    dump = subprocess.run([dcmtk.tool("dsrdump"), "+Pl", str(sr_path)], capture_output=True, text=True,
                          check=True).stdout
    assert "Imaging Measurement Report" in dump and "not a diagnosis" in dump
    assert f'"Lung severity score, 6 zones")="{result.total_score}.0"' in dump
    assert dump.count("Referenced Segment") >= len(groups)
    summary = json.loads(sr_path.with_suffix(".json").read_text())
    (figures,) = summary["lung_involvement"]
    assert summary["referenced_seg_sop_instance_uid"] == seg.SOPInstanceUID
    assert figures["total_score"] == result.total_score and "not a diagnosis" in figures["disclaimer"]


@pytest.mark.skipif(not dciodvfy.available(), reason="dciodvfy needed")
def test_key_images_axial_and_coronal_are_valid_and_coloured(tmp_path, case, result):
    lungs = segment_lungs_classical(case.volume)
    loaded = load_series(write_ct_volume(case.volume, tmp_path / "ct"))
    sources = [pydicom.dcmread(s.path, stop_before_pixels=True) for s in loaded.slices]
    seed = UidSeed(str(sources[0].SeriesInstanceUID), 1, "chest_ct")
    paths = write_key_images(result, lungs, loaded.volume, sources, tmp_path / "key",
                             KeyImageOptions(OutputSeries(seed, 9903, "AI chest_ct")))
    assert [p.name.split("_")[1] for p in paths] == ["axial", "coronal"]
    for path in paths:
        validation = dciodvfy.validate(path)
        assert validation.errors == [], validation.report()
    axial, coronal = (pydicom.dcmread(p) for p in paths)
    k, j, i = case.volume.shape
    assert axial.pixel_array.shape == (j, i, 3) and coronal.pixel_array.shape == (k, i, 3)
    assert axial.SourceImageSequence[0].ReferencedSOPInstanceUID in {s.SOPInstanceUID for s in sources}
    assert [float(v) for v in coronal.PixelSpacing] == [case.volume.spacing[2], case.volume.spacing[0]]
    assert list(coronal.PatientOrientation) == ["L", "F"] and axial.BurnedInAnnotation == "YES"
    for image in (axial, coronal):
        rgb = image.pixel_array.astype(int)
        yellowish = (rgb[..., 0] > rgb[..., 2] + 60) & (rgb[..., 1] > rgb[..., 2] + 60)
        assert np.count_nonzero(yellowish) > 50  # the ground-glass slab is tinted
        assert np.count_nonzero(np.all(rgb == (60, 140, 255), axis=-1)) > 50  # lung outlines
    # Head at the top: this scan reaches 50 mm above the lungs and 30 mm below them.
    rows = np.flatnonzero(np.all(coronal.pixel_array == (60, 140, 255), axis=-1).any(axis=1))
    assert rows[0] == pytest.approx(50 / case.volume.spacing[2], abs=1.5)
    assert k - 1 - rows[-1] == pytest.approx(30 / case.volume.spacing[2], abs=1.5)


def test_no_lung_is_not_assessed_rather_than_scored_none():
    case = chest_case(z_range_mm=(-260.0, -120.0), lungs=())  # abdomen below the lungs, bowel gas
    result = quantify_involvement(case.volume, segment_lungs_classical(case.volume))
    assert (result.lungs, result.zones, result.category) == ((), (), "not assessed")
    assert result.as_json()["max_score"] == 0



@pytest.mark.skipif(not dciodvfy.available(), reason="dciodvfy needed")
def test_report_says_involvement_was_not_assessed_without_lungs(tmp_path):
    """No lung in the series: no measurement group, no disclaimer, a Comment saying it was not assessed."""
    case = chest_case(z_range_mm=(-260.0, -120.0), lungs=())
    result = quantify_involvement(case.volume, segment_lungs_classical(case.volume))
    loaded = load_series(write_ct_volume(case.volume, tmp_path / "ct"))
    sources = [pydicom.dcmread(s.path, stop_before_pixels=True) for s in loaded.slices]
    seed = UidSeed(str(sources[0].SeriesInstanceUID), 1, "chest_ct")
    path = write_report(ReportContent((StepOutcome("involvement", "ok"),), involvements=(result,)), sources,
                        tmp_path / "out", SrOptions(OutputSeries(seed, 9902, "AI chest_ct")))
    validation = dciodvfy.validate(path)
    assert validation.errors == [], validation.report()
    sr = hd.sr.srread(path)
    assert sr.content.get_volumetric_roi_measurement_groups() == [] and sr.content.get_image_measurement_groups() == []
    assert comments(sr) == ["Lung involvement: not assessed, no lung found in the series",
                            "Step involvement: completed"]
    (figures,) = json.loads(path.with_suffix(".json").read_text())["lung_involvement"]
    assert figures["category"] == "not assessed"


def test_job_writes_seg_measurement_report_and_key_images(tmp_path):
    """The worker's produce(): a chest pipeline of the two built-in steps with every output kind."""
    case = chest_case((Lesion("left", "lower", GROUND_GLASS_HU, posterior_y_mm=20.0),))
    paths = write_ct_volume(case.volume, tmp_path / "ct")
    config = Config.model_validate({
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
        "pipelines": {"chest": {"match": {"modality": "CT"}, "destinations": ["pacs"],
                                "outputs": ["seg", "sr", "keyimage"],
                                "steps": [{"name": "lungs", "task": "lung_classical", "options": {"min_lung_ml": 20}},
                                          {"name": "involvement", "task": "lung_involvement", "input_mask": "lungs"}]}}})
    series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    record = JobRecord(1, series_uid, 1, "chest", JobState.RUNNING, 1, None, datetime.now(timezone.utc), None, None, None,
                       JobKind.PIPELINE)
    output = produce(JobRequest(config, record, "", tuple(str(p) for p in paths), str(tmp_path / "out")))
    classes = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in output.exported]
    assert classes == ["1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.88.33",
                       "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7"]  # SEG, SR, 2 key images
    assert len(set(output.sop_instance_uids)) == 4
    summary = json.loads(Path(output.exported[1]).with_suffix(".json").read_text())
    assert summary["referenced_seg_sop_instance_uid"] == output.sop_instance_uids[0]
    (figures,) = summary["lung_involvement"]
    assert figures["zones"][5]["score"] == 2 and figures["total_score"] == 2
    # What /v1/jobs/{id} shows: the same figures, with the SR's and the SEG's UIDs.
    shown = _involvement(str(tmp_path / "out"))
    assert shown["sop_instance_uid"] == output.sop_instance_uids[1] and shown["zones"] == figures["zones"]

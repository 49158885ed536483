"""Routing rules: each condition form, the shipped pipelines, localizers and MR kept out."""

from __future__ import annotations

import dataclasses

import pytest

from tests.peers import REPO

from dicom_node.config import Config, load_config
from dicom_node.pipeline.route import match_pipelines, unmatched_reasons
from dicom_node.pipeline.volume import SeriesSummary

AXIAL_CT = SeriesSummary(
    study_instance_uid="1.2.3",
    series_instance_uid="1.2.3.4",
    modality="CT",
    body_part_examined="ABDOMEN",
    series_description="Abdomen 1.0 B31f",
    image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
    slice_thickness=1.0,
    number_of_slices=120,
    manufacturer="SIEMENS",
    contrast_agent=None,
    orientation="axial",
    image_instances=120,
    non_image_sop_classes=(),
)


def series(**changes) -> SeriesSummary:
    return dataclasses.replace(AXIAL_CT, **changes)


def config_with(match: dict, enabled: bool = True) -> Config:
    return Config.model_validate({"pipelines": {"p": {
        "enabled": enabled, "match": match,
        "steps": [{"name": "s", "task": "segmentation", "model": "m"}],
    }}})


def matches(match: dict, summary: SeriesSummary = AXIAL_CT, calling_ae: str = "STORESCU",
            called_ae: str = "DICOMNODE") -> bool:
    return [m.pipeline for m in match_pipelines(config_with(match), summary, calling_ae, called_ae)] == ["p"]


@pytest.fixture(scope="module")
def shipped() -> Config:
    return load_config(REPO / "config.yaml")


def test_equality_is_case_insensitive_and_stripped():
    assert matches({"modality": "ct"})
    assert matches({"manufacturer": " Siemens "})
    assert matches({"modality": "CT"}, series(modality="CT "))
    assert not matches({"modality": "MR"})


def test_numeric_equality():
    assert matches({"slice_thickness": 1})
    assert matches({"number_of_slices": 120.0})
    assert not matches({"slice_thickness": 5})


def test_list_membership():
    assert matches({"body_part_examined": ["chest", "abdomen"]})
    assert not matches({"body_part_examined": ["CHEST", "LUNG"]})
    assert matches({"number_of_slices": [60, 120]})


def test_regex_searches_anywhere_ignoring_case():
    assert matches({"series_description": {"regex": "b31"}})
    assert matches({"series_description": {"regex": r"^abdomen\s"}})
    assert not matches({"series_description": {"regex": "^B31"}})
    assert matches({"image_type": {"regex": "^axial$"}})  # any value of a multi-valued attribute


def test_numeric_ranges_inclusive_either_bound_optional():
    assert matches({"number_of_slices": {"min": 120}})
    assert matches({"number_of_slices": {"max": 120}})
    assert matches({"slice_thickness": {"min": 0.5, "max": 1.5}})
    assert not matches({"slice_thickness": {"min": 2}})
    assert not matches({"number_of_slices": {"max": 10}})


def test_contains_all_for_image_type():
    assert matches({"image_type": {"contains_all": ["original", "axial"]}})
    assert matches({"image_type": {"contains_all": ["ORIGINAL", "PRIMARY", "AXIAL"]}},
                   series(image_type=("ORIGINAL", "PRIMARY", "AXIAL", "CT_SOM5 SPI")))
    assert not matches({"image_type": {"contains_all": ["ORIGINAL", "PRIMARY", "AXIAL"]}},
                       series(image_type=("DERIVED", "SECONDARY", "AXIAL")))


def test_calling_and_called_ae():
    assert matches({"calling_ae": "storescu"})
    assert not matches({"calling_ae": "CT_SCANNER_2"})
    assert matches({"called_ae": ["DICOMNODE", "AI_SPLEEN"]}, called_ae="AI_SPLEEN")
    assert not matches({"called_ae": "AI_SPLEEN"})


def test_missing_attribute_never_matches_a_positive_condition():
    no_body_part = series(body_part_examined="", contrast_agent=None, slice_thickness=None)
    assert not matches({"body_part_examined": ["CHEST", "ABDOMEN"]}, no_body_part)
    assert not matches({"body_part_examined": {"regex": ".*"}}, no_body_part)
    assert not matches({"contrast_agent": {"regex": ""}}, no_body_part)
    assert not matches({"slice_thickness": {"max": 10}}, no_body_part)
    assert not matches({"image_type": {"contains_all": ["ORIGINAL"]}}, series(image_type=()))


def test_every_condition_must_hold_and_reasons_say_why():
    config = config_with({"modality": "CT", "number_of_slices": {"min": 10}})
    [match] = match_pipelines(config, AXIAL_CT, "STORESCU", "DICOMNODE")
    assert match.reasons == ("modality 'CT' = 'CT'", "number_of_slices 120 >= 10")
    assert unmatched_reasons(config, series(number_of_slices=3), "STORESCU", "DICOMNODE") == {
        "p": "not number_of_slices 3 >= 10"}


def test_shipped_spleen_pipeline_takes_axial_ct(shipped):
    assert [m.pipeline for m in match_pipelines(shipped, AXIAL_CT, "STORESCU", "DICOMNODE")] == ["spleen_ct"]


@pytest.mark.parametrize("body_part", ["CHEST", "chest", "LUNG", "THORAX", "CHESTABDOMEN", "CHESTABDPELVIS"])
def test_chest_ct_matches_both_pipelines_in_config_order(shipped, body_part):
    """A scan whose Body Part Examined covers the whole chest (PS3.16 Annex L terms, any case) gets the lungs."""
    chest = series(body_part_examined=body_part)
    assert [m.pipeline for m in match_pipelines(shipped, chest, "STORESCU", "DICOMNODE")] == ["spleen_ct", "chest_ct"]


@pytest.mark.parametrize("body_part", ["ABDOMEN", "ABDOMENPELVIS", "HEAD", ""])
def test_ct_not_covering_the_chest_gets_no_lung_pipeline(shipped, body_part):
    other = series(body_part_examined=body_part)
    assert "chest_ct" in unmatched_reasons(shipped, other, "STORESCU", "DICOMNODE")


def test_localizer_is_not_sent_to_ct_models(shipped):
    localizer = series(image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), number_of_slices=2,
                       orientation="coronal", body_part_examined="CHEST")
    assert match_pipelines(shipped, localizer, "STORESCU", "DICOMNODE") == []
    reasons = unmatched_reasons(shipped, localizer, "STORESCU", "DICOMNODE")
    assert reasons["spleen_ct"].startswith("not image_type ORIGINAL\\PRIMARY\\LOCALIZER contains all of")


def test_mr_series_is_not_sent_to_ct_models(shipped):
    mr = series(modality="MR", image_type=("ORIGINAL", "PRIMARY", "M", "ND"), body_part_examined="CHEST")
    assert match_pipelines(shipped, mr, "STORESCU", "DICOMNODE") == []
    assert unmatched_reasons(shipped, mr, "STORESCU", "DICOMNODE") == {
        "spleen_ct": "not modality 'MR' = 'CT'", "chest_ct": "not modality 'MR' = 'CT'"}


def test_disabled_pipeline_takes_nothing():
    config = config_with({"modality": "CT"}, enabled=False)
    assert match_pipelines(config, AXIAL_CT, "STORESCU", "DICOMNODE") == []
    assert unmatched_reasons(config, AXIAL_CT, "STORESCU", "DICOMNODE") == {"p": "pipeline disabled"}


def test_a_series_without_pixel_data_goes_to_no_pipeline_but_is_forwarded():
    """A dose report SR carries the CT's attributes a rule may ask for, yet no image: pipelines never see it;
    a forward rule with the same conditions still sends it on."""
    dose_report = series(modality="SR", image_instances=0, number_of_slices=0,
                         non_image_sop_classes=("1.2.840.10008.5.1.4.1.1.88.67",))
    config = Config.model_validate({
        "pipelines": {"p": {"match": {"calling_ae": "STORESCU"},
                            "steps": [{"name": "s", "task": "segmentation", "model": "m"}]}},
        "forward": {"archive": {"match": {"calling_ae": "STORESCU"}, "destinations": ["pacs"]}},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}},
    })
    assert [m.pipeline for m in match_pipelines(config, dose_report, "STORESCU", "DICOMNODE")] == ["archive"]
    assert unmatched_reasons(config, dose_report, "STORESCU", "DICOMNODE") == {
        "p": "not an image series: no instance has pixel data (X-Ray Radiation Dose SR Storage)"}
    assert [m.pipeline for m in match_pipelines(config, AXIAL_CT, "STORESCU", "DICOMNODE")] == \
        ["archive", "p"]

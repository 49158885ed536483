"""Config loading: the shipped files validate; every mistake is reported with file:line and key path."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.peers import REPO

from dicom_node.config import Config, ConfigError, load_config

DICOM_NODE = Path(sys.executable).parent / "dicom-node"  # the installed console script


def errors_of(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(ConfigError) as raised:
        load_config(path)
    return raised.value.errors


def check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(DICOM_NODE), "check-config", str(path)], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", ["config.yaml", "config.triton.yaml"])
def test_shipped_configs_validate(name):
    config = load_config(REPO / name)
    assert set(config.pipelines) == {"spleen_ct", "chest_ct"}
    assert config.pipelines["chest_ct"].steps[1].input_mask == "lungs"
    assert config.destinations["pacs"].ae_title == "ORTHANC"
    assert config.security.allow_any_calling_ae is False
    assert [ae.ae_title for ae in config.security.calling_aes] == ["STORESCU"]
    assert config.source_path == (REPO / name).resolve()
    result = check_config(REPO / name)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{REPO / name}: ok (AE DICOMNODE on 0.0.0.0:11112, 2 pipelines")


def test_triton_config_points_at_the_compose_services():
    config = load_config(REPO / "config.triton.yaml")
    assert config.inference.backend == "triton"
    assert config.inference.triton.url == "tritonserver:8001"
    assert config.inference.model_repository == Path("/models")
    assert config.destinations["pacs"].host == "orthanc"


def test_triton_pool_urls(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("inference:\n  backend: triton\n  triton:\n    urls: [a:8001, b:8001]\n    backoff_s: 2\n")
    settings = load_config(path).inference.backend_settings()
    assert (settings.servers, settings.backoff_s) == (("a:8001", "b:8001"), 2)
    path.write_text("inference:\n  triton:\n    url: a:8001\n")
    assert load_config(path).inference.backend_settings().servers == ("a:8001",)
    assert Config().inference.backend_settings().servers == ("127.0.0.1:8001",)
    assert errors_of(tmp_path, """
        inference:
          triton: {url: a:8001, urls: [b:8001]}
        """) == ["config.yaml:3 inference.triton: give url (one server) or urls (a pool), not both"]
    assert errors_of(tmp_path, """
        inference:
          triton:
            urls: [a:8001, a:8001]
        """) == ["config.yaml:4 inference.triton.urls: urls lists a:8001 more than once"]


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    folder = tmp_path / "etc"
    folder.mkdir()
    shutil.copy(REPO / "config.yaml", folder / "config.yaml")
    monkeypatch.chdir(tmp_path)
    config = load_config(Path("etc/config.yaml"))
    assert config.node.storage_dir == folder / "var"
    assert config.inference.model_repository == folder / "models"
    assert config.node.journal_url == f"sqlite:///{folder / 'var' / 'journal.sqlite'}"


def test_empty_file_gives_the_defaults(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("# nothing configured\n")
    config = load_config(path)
    assert (config.node.ae_title, config.node.port, config.completion.stable_seconds) == ("DICOMNODE", 11112, 30)
    assert config.pipelines == {} and config.destinations == {}


def test_broken_yaml_is_located(tmp_path):
    assert errors_of(tmp_path, """\
        node:
          ae_title: DICOMNODE
          port: [11112
        """) == ["config.yaml:4: invalid YAML: expected ',' or ']', but got '<stream end>'"]


def test_unknown_key_is_an_error_not_ignored(tmp_path):
    assert errors_of(tmp_path, """\
        node:
          ae_title: DICOMNODE
        security:
          allow_any_calling_ae: false
          calling_ae: [{ae_title: STORESCU}]
        """) == ["config.yaml:5 security.calling_ae: Extra inputs are not permitted"]


def test_wrong_type(tmp_path):
    assert errors_of(tmp_path, """\
        completion:
          stable_seconds: soon
        """) == ["config.yaml:2 completion.stable_seconds: Input should be a valid number, unable to parse string as a number"]


def test_port_out_of_range_in_a_destination(tmp_path):
    assert errors_of(tmp_path, """\
        destinations:
          pacs:
            ae_title: ORTHANC
            host: 127.0.0.1

            port: 65536
        """) == ["config.yaml:6 destinations.pacs.port: Input should be less than or equal to 65535"]


def test_missing_required_key_points_at_its_section(tmp_path):
    assert errors_of(tmp_path, """\
        destinations:
          pacs:
            ae_title: ORTHANC
            port: 104
        """) == ["config.yaml:2 destinations.pacs.host: Field required"]


PIPELINE = """\
    destinations:
      pacs: {{ae_title: ORTHANC, host: 127.0.0.1, port: 4242}}
    pipelines:
      chest:
        match:
          modality: CT
          {match}
        steps:
          - {{name: lungs, task: lung_classical}}
          - {{name: covid, task: classification, model: covid19_ct, input_mask: {mask}}}
        destinations: [pacs, {destination}]
    """


def pipeline(match: str = "orientation: axial", mask: str = "lungs", destination: str = "pacs") -> str:
    return PIPELINE.format(match=match, mask=mask, destination=destination)


def test_valid_pipeline_template(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(pipeline()))
    assert load_config(path).pipelines["chest"].destinations == ["pacs", "pacs"]


def test_unknown_destination_in_a_pipeline(tmp_path):
    assert errors_of(tmp_path, pipeline(destination="archive")) == [
        "config.yaml:11 pipelines.chest.destinations.1: unknown destination 'archive' (not under destinations)"]


def test_unknown_destination_also_refused_without_a_file():
    with pytest.raises(ValueError, match=r"pipelines\.p\.destinations\.0: unknown destination 'nowhere'"):
        Config.model_validate({"pipelines": {"p": {
            "match": {"modality": "CT"}, "steps": [{"name": "s", "task": "lung_classical"}],
            "destinations": ["nowhere"]}}})


def test_input_mask_must_name_an_earlier_step(tmp_path):
    assert errors_of(tmp_path, pipeline(mask="spleen")) == [
        "config.yaml:8 pipelines.chest.steps: step 'covid': input_mask 'spleen' is not an earlier step"]


def test_unknown_match_key(tmp_path):
    assert errors_of(tmp_path, pipeline(match="body_part: CHEST")) == [
        "config.yaml:5 pipelines.chest.match: unknown match key(s) body_part; known: body_part_examined, called_ae, "
        "calling_ae, contrast_agent, image_type, manufacturer, modality, number_of_slices, orientation, "
        "series_description, slice_thickness"]


def test_match_condition_errors_name_the_condition(tmp_path):
    assert errors_of(tmp_path, pipeline(match="number_of_slices: {minimum: 10}")) == [
        "config.yaml:7 pipelines.chest.match.number_of_slices.minimum: Extra inputs are not permitted"]
    assert errors_of(tmp_path, pipeline(match='series_description: {regex: "(axial"}')) == [
        "config.yaml:7 pipelines.chest.match.series_description.regex: "
        "invalid regular expression: missing ), unterminated subpattern at position 0"]
    assert errors_of(tmp_path, pipeline(match="orientation:")) == [
        "config.yaml:7 pipelines.chest.match.orientation: a match condition is a value, a list of values, "
        "{regex: ...}, {min: ..., max: ...} or {contains_all: [...]}"]


def test_segmentation_step_needs_a_model(tmp_path):
    text = pipeline().replace("{name: lungs, task: lung_classical}", "{name: lungs, task: segmentation}")
    assert errors_of(tmp_path, text) == ["config.yaml:9 pipelines.chest.steps.0: task segmentation needs a model"]


def test_check_config_exits_2_with_located_errors(tmp_path):
    path = tmp_path / "config.yaml"
    text = (REPO / "config.yaml").read_text()
    path.write_text(text.replace("port: 4242", "port: 99999").replace("  max_pdu: 262144", "  max_pdu_size: 262144"))
    result = check_config(path)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    port_line = next(n for n, line in enumerate(text.splitlines(), 1) if "port: 4242" in line)
    pdu_line = next(n for n, line in enumerate(text.splitlines(), 1) if line.startswith("  max_pdu:"))
    assert lines == [
        f"config.yaml:{pdu_line} node.max_pdu_size: Extra inputs are not permitted",
        f"config.yaml:{port_line} destinations.pacs.port: Input should be less than or equal to 65535",
    ]
    assert result.stdout == ""


def test_check_config_exits_2_on_broken_yaml_and_missing_file(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("node: {port: 11112\n")
    result = check_config(path)
    assert (result.returncode, result.stderr.split(" invalid YAML")[0]) == (2, "config.yaml:2:")
    missing = check_config(tmp_path / "absent.yaml")
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_status_api_off_loopback_needs_a_bearer_token(tmp_path):
    assert errors_of(tmp_path, """\
        http:
          host: 0.0.0.0
          port: 8080
        """) == ["config.yaml:1 http: host 0.0.0.0 is not loopback: set bearer_token (16 characters or more)"]
    path = tmp_path / "config.yaml"
    path.write_text("http: {host: 0.0.0.0, bearer_token: 0123456789abcdef0123}\n")
    assert load_config(path).http.port == 8080


def test_built_in_step_options_are_validated_where_they_are_written(tmp_path):
    text = pipeline().replace("{name: lungs, task: lung_classical}",
                              "{name: lungs, task: lung_classical, options: {min_lung_ml: 20, closing_mm: 2}}")
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    assert load_config(path).pipelines["chest"].steps[0].parameters().closing_mm == 2.0
    wrong = pipeline().replace("{name: lungs, task: lung_classical}",
                               "{name: lungs, task: lung_classical, options: {min_volume: 20}}")
    (error,) = errors_of(tmp_path, wrong)
    assert error.startswith("config.yaml:9 pipelines.chest.steps.0: unknown option(s) min_volume; known:")
    assert errors_of(tmp_path, pipeline().replace(
        "{name: lungs, task: lung_classical}",
        "{name: lungs, task: lung_classical, options: {parenchyma_hu: [-600, -900]}}")) == [
        "config.yaml:9 pipelines.chest.steps.0: option parenchyma_hu: low must be below high, "
        "got [-600.0, -900.0]"]
    assert errors_of(tmp_path, pipeline().replace(
        "input_mask: lungs}", "input_mask: lungs, options: {crop_margin_mm: 5}}")) == [
        "config.yaml:10 pipelines.chest.steps.1: options are for the built-in tasks (lung_classical, "
        "lung_involvement), not classification: a model's settings live in its pipeline.yaml"]


def test_lung_involvement_reads_a_lung_classical_step(tmp_path):
    involvement = "{name: covid, task: lung_involvement, input_mask: lungs, options: {vessels: count}}"
    text = pipeline().replace("{name: covid, task: classification, model: covid19_ct, input_mask: lungs}", involvement)
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    assert load_config(path).pipelines["chest"].steps[1].parameters().vessels == "count"
    assert errors_of(tmp_path, text.replace(", input_mask: lungs", "")) == [
        "config.yaml:10 pipelines.chest.steps.1: lung_involvement needs input_mask: "
        "the lung_classical step whose lungs it measures"]
    spleen = text.replace("{name: lungs, task: lung_classical}", "{name: lungs, task: segmentation, model: spleen_ct}")
    assert errors_of(tmp_path, spleen) == [
        "config.yaml:8 pipelines.chest.steps: step 'covid': input_mask 'lungs' is not a lung_classical step"]


def test_sop_class_lists_name_standard_storage_classes(tmp_path):
    """Keywords and UIDs resolve to UIDs; a misspelt keyword or a standard UID that is no storage class is an
    error with its line (check-config's output), a private UID is the admin's to accept."""
    assert Config().node.sop_classes.allow is None and Config().node.sop_classes.deny == []  # every class
    path = tmp_path / "config.yaml"
    path.write_text("node:\n  sop_classes:\n    allow: [CTImageStorage, 1.2.840.10008.5.1.4.1.1.88.67, "
                    "1.3.12.2.1107.5.9.1]\n    deny: [EncapsulatedPDFStorage]\n")
    narrowed = load_config(path).node.sop_classes
    assert narrowed.allow == ["1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.88.67", "1.3.12.2.1107.5.9.1"]
    assert narrowed.deny == ["1.2.840.10008.5.1.4.1.1.104.1"]
    path.write_text("node:\n  sop_classes:\n    allow: [CTImageStorag, 1.2.840.10008.1.1]\n    deny: [x/y]\n")
    result = check_config(path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "config.yaml:3 node.sop_classes.allow: 'CTImageStorag' is neither a storage SOP class keyword (such as "
        "CTImageStorage) nor a UID; 1.2.840.10008.1.1 is not a standard storage SOP class UID (Verification SOP Class)",
        "config.yaml:4 node.sop_classes.deny: 'x/y' is neither a storage SOP class keyword (such as CTImageStorage) "
        "nor a UID",
    ]
    path.write_text("node:\n  sop_classes:\n    allow: [CTImageStorage]\n    deny: [CTImageStorage]\n")
    assert errors_of(tmp_path, path.read_text()) == [
        "config.yaml:2 node.sop_classes: allow and deny leave no storage SOP class to accept"]

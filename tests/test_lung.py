"""Classical lung segmentation on a chest phantom (known truth) and on a real abdominal CT."""

from __future__ import annotations

import numpy as np
import pytest

from inference.lung import LEFT_LUNG, RIGHT_LUNG, LungParameters, fill_holes_slicewise, segment_lungs_classical
from dicom_node.pipeline.volume import load_series
from inference.volume import Volume
from tests.peers import CT_J2K_SERIES
from tests.chest_phantoms import chest_case
from tests.volumes import dice, read_series
from tests.phantoms import chest_phantom, write_ct_volume



@pytest.mark.parametrize("gap_mm", [40.0, -2.0], ids=["apart", "touching"])
def test_phantom_lungs_right_left_and_trachea_excluded(gap_mm):
    phantom = chest_phantom(lung_gap_mm=gap_mm)
    result = segment_lungs_classical(phantom.volume)
    labels = result.volume.array
    assert result.volume.same_grid(phantom.volume)
    assert [s.type.value for s in result.segments] == ["3341006", "44029006"]
    assert [s.value for s in result.segments] == [RIGHT_LUNG.value, LEFT_LUNG.value]
    assert all(s.category.value == "123037004" for s in result.segments)
    # The right lung lies at -x in LPS (patient's right), the left at +x.
    x_right = result.volume.index_to_lps(np.argwhere(labels == 1)[:, ::-1])[:, 0]
    x_left = result.volume.index_to_lps(np.argwhere(labels == 2)[:, ::-1])[:, 0]
    assert x_right.mean() < -50 and x_left.mean() > 50
    assert dice(labels == 1, phantom.right_lung) > 0.9
    assert dice(labels == 2, phantom.left_lung) > 0.9
    # Vessels (40 HU tubes inside the lungs) are filled back in.
    vessels = (phantom.right_lung | phantom.left_lung) & (phantom.volume.array > -300)
    assert vessels.any() and (labels[vessels] > 0).mean() > 0.95
    # The trachea above the lungs is never labelled; of the bronchi outside the
    # lungs at most the stretch where they enter the hilum is.
    above_lungs = ~(phantom.right_lung | phantom.left_lung).any(axis=(1, 2))
    assert phantom.trachea[above_lungs].any() and not labels[above_lungs].any()
    assert (labels[phantom.trachea] > 0).mean() < 0.2


def test_phantom_written_as_dicom_segments_the_same(tmp_path):
    phantom = chest_phantom()
    paths = write_ct_volume(phantom.volume, tmp_path / "chest")
    assert len(paths) == phantom.volume.shape[0]
    loaded = load_series(paths)  # the node's own loader
    assert loaded.summary.body_part_examined == "CHEST" and loaded.summary.modality == "CT"
    volume = loaded.volume
    assert volume.same_grid(phantom.volume) and np.array_equal(volume.array, phantom.volume.array)
    assert read_series(tmp_path / "chest").same_grid(phantom.volume)  # and GDCM reads the same grid
    expected = segment_lungs_classical(phantom.volume).volume.array
    assert np.array_equal(segment_lungs_classical(volume).volume.array, expected)


@pytest.mark.parametrize("min_lung_ml", [LungParameters().min_lung_ml, 1.0], ids=["default", "no-size-limit"])
def test_abdomen_gives_no_bowel_gas(min_lung_ml):
    """The shared abdomen holds lung bases only and much bowel gas: nothing or little, never gas."""
    volume = read_series(CT_J2K_SERIES)
    labels = segment_lungs_classical(volume, LungParameters(min_lung_ml=min_lung_ml)).volume.array
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    assert np.count_nonzero(labels) * voxel_ml < 20.0
    # Bowel gas: air enclosed by the body in its anterior half (supine patient).
    hu = volume.array
    body = fill_holes_slicewise(hu > -500)
    body_rows = np.flatnonzero(body.any(axis=(0, 2)))
    anterior = np.zeros(hu.shape, dtype=bool)
    anterior[:, : (body_rows[0] + body_rows[-1]) // 2, :] = True
    gas = body & anterior & (hu < -320)
    assert np.count_nonzero(gas) * voxel_ml > 10.0  # the series really holds bowel gas
    assert not labels[gas].any()


def test_empty_volume_gives_empty_label_map():
    volume = Volume(np.full((4, 32, 32), -1000, np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    result = segment_lungs_classical(volume)
    assert result.volume.array.dtype == np.uint8 and not result.volume.array.any()


def test_flipped_axes_give_the_same_lungs():
    """Slices stored feet-last and columns right-to-left (direction diag(-1, 1, -1)): same anatomy, same labels."""
    volume = chest_phantom().volume
    expected = segment_lungs_classical(volume).volume.array
    corner = volume.index_to_lps(np.array([volume.shape[2] - 1, 0, volume.shape[0] - 1]))
    flipped = Volume(volume.array[::-1, :, ::-1].copy(), volume.spacing, tuple(corner), np.diag([-1.0, 1.0, -1.0]))
    labels = segment_lungs_classical(flipped).volume.array
    assert np.array_equal(labels[::-1, :, ::-1], expected)


@pytest.mark.parametrize(("variant", "kwargs"), [
    ("full", {}),
    ("bases only (abdominal CT), bowel gas", {"z_range_mm": (-260.0, -80.0), "bowel_gas": True}),
    ("apices only (neck CT)", {"z_range_mm": (80.0, 250.0)}),
    ("air outside the body, bowel gas", {"z_range_mm": (-260.0, 150.0), "outside_air": True, "bowel_gas": True}),
])
def test_partial_and_full_lungs_found_wherever_they_are(variant, kwargs):
    case = chest_case(**kwargs)
    labels = segment_lungs_classical(case.volume).volume.array
    assert dice(labels == RIGHT_LUNG.value, case.right_lung) >= 0.95, variant
    assert dice(labels == LEFT_LUNG.value, case.left_lung) >= 0.95, variant
    assert case.bowel_gas.any() == kwargs.get("bowel_gas", False)
    assert case.outside_air.any() == kwargs.get("outside_air", False)
    assert not labels[case.bowel_gas | case.outside_air].any()
    if variant.startswith("bases"):
        # 40-100 mL each: below the 100 mL that once dropped real lung bases.
        assert all(20 < np.count_nonzero(m) * 0.025 < 100 for m in (case.right_lung, case.left_lung))


@pytest.mark.parametrize("side", ["right", "left"])
def test_one_lung_keeps_its_side(side):
    case = chest_case(lungs=(side,))
    labels = segment_lungs_classical(case.volume).volume.array
    expected, other = (RIGHT_LUNG, LEFT_LUNG) if side == "right" else (LEFT_LUNG, RIGHT_LUNG)
    truth = case.right_lung if side == "right" else case.left_lung
    assert dice(labels == expected.value, truth) >= 0.95
    assert not (labels == other.value).any()


def test_minimum_volume_is_an_option():
    case = chest_case(z_range_mm=(-260.0, -80.0))
    volume_ml = np.count_nonzero(case.right_lung) * 0.025
    dropped = segment_lungs_classical(case.volume, LungParameters.from_options({"min_lung_ml": volume_ml + 10}))
    assert not dropped.volume.array.any()
    kept = segment_lungs_classical(case.volume, LungParameters.from_options({"min_lung_ml": volume_ml - 10}))
    assert dice(kept.volume.array == RIGHT_LUNG.value, case.right_lung) >= 0.95


def test_smoothing_and_airway_options():
    case = chest_case()
    closed = segment_lungs_classical(case.volume, LungParameters.from_options({"closing_mm": 5}))
    assert dice(closed.volume.array == RIGHT_LUNG.value, case.right_lung) >= 0.95
    airways = fill_holes_slicewise(case.volume.array > -500) & (case.material == -1000.0)  # trachea, bronchi
    default = segment_lungs_classical(case.volume).volume.array
    with_airways = segment_lungs_classical(case.volume, LungParameters.from_options({"exclude_airways": False}))
    assert np.count_nonzero(with_airways.volume.array[airways]) > 2 * np.count_nonzero(default[airways])


@pytest.mark.parametrize(("options", "message"), [
    ({"min_lung_ml": -1}, "must not be negative"),
    ({"min_lung_ml": "big"}, "expected a number"),
    ({"parenchyma_hu": [-600, -900]}, "low must be below high"),
    ({"exclude_airways": 1}, "expected true or false"),
    ({"max_split_erosions": 2.5}, "whole number"),
    ({"threshold": -320}, "unknown option"),
])
def test_lung_options_are_validated(options, message):
    with pytest.raises(ValueError, match=message):
        LungParameters.from_options(options)

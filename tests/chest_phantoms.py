"""Chest CT phantoms with COVID-19-like opacities, and partial-lung variants, made at test time.

Supine body (soft tissue, 40 HU) in air (-1000 HU) on a table; two lungs
(-850 HU, ellipsoids) with trachea and main bronchi (-1000 HU) and vessels
(40 HU tubes); lesions of known HU (ground-glass -500, consolidation 0,
emphysema -990) placed in a known zone. The scan range (`z_range_mm`) cuts
the body like an abdominal CT (lung bases only) or a neck CT (apices only).
Geometry is in LPS mm (PS3.3 C.7.6.2.1.1): +x patient left, +y posterior,
+z head; the lungs span z -100..+100 mm, so zones are thirds of that.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inference.volume import Volume

AIR, SOFT_TISSUE, PARENCHYMA, TABLE = -1000.0, 40.0, -850.0, 300.0
GROUND_GLASS, CONSOLIDATION, EMPHYSEMA = -500.0, 0.0, -990.0
LUNG_SEMI_MM = np.array([60.0, 80.0, 100.0])
LUNG_CENTRE_X_MM = 80.0  # |x| of each lung's centre
ZONE_CENTRE_Z_MM = {"upper": 66.7, "middle": 0.0, "lower": -66.7}
VESSEL_OFFSETS_MM = ((-20.0, -25.0), (15.0, 10.0), (-5.0, 35.0))  # (dx from the lung centre, y)


@dataclass(frozen=True)
class Lesion:
    """A sphere of `hu` in one zone of one lung, or with `posterior_fraction` the posterior part of the zone."""

    side: str  # "right" | "left"
    zone: str  # "upper" | "middle" | "lower"
    hu: float
    radius_mm: float = 12.0
    posterior_y_mm: float | None = None  # slab: every lung voxel of the zone posterior of this y


@dataclass(frozen=True, eq=False)
class ChestCase:
    volume: Volume  # HU, int16
    right_lung: np.ndarray  # truth incl. vessels and lesions, airways excluded
    left_lung: np.ndarray
    vessels: np.ndarray  # vessel voxels inside the lungs, not hidden by a lesion
    material: np.ndarray  # noise-free HU of every voxel
    bowel_gas: np.ndarray
    outside_air: np.ndarray  # air enclosed outside the body (between body and a positioning ring)


def _segment_distance(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    axis = end - start
    t = np.clip(((points - start) @ axis) / float(axis @ axis), 0.0, 1.0)
    return np.linalg.norm(points - (start + t[..., None] * axis), axis=-1)


def chest_case(lesions: tuple[Lesion, ...] = (), *, z_range_mm: tuple[float, float] = (-130.0, 150.0),
               lungs: tuple[str, ...] = ("right", "left"), bowel_gas: bool = False, outside_air: bool = False,
               spacing: tuple[float, float, float] = (2.5, 2.5, 4.0), noise_hu: float = 10.0,
               seed: int = 0) -> ChestCase:
    """The phantom, scanned from z_range_mm[0] to z_range_mm[1] (slices ordered feet to head)."""
    i, j = 160, 128
    k = int(round((z_range_mm[1] - z_range_mm[0]) / spacing[2])) + 1
    origin = np.array([-(i - 1) / 2 * spacing[0], -(j - 1) / 2 * spacing[1], z_range_mm[0]])
    x = origin[0] + np.arange(i) * spacing[0]
    y = origin[1] + np.arange(j) * spacing[1]
    z = origin[2] + np.arange(k) * spacing[2]
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    points = np.stack([xx, yy, zz], axis=-1)

    hu = np.full(zz.shape, AIR, dtype=np.float32)
    body = (xx / 160.0) ** 2 + (yy / 110.0) ** 2 <= 1.0
    hu[body] = SOFT_TISSUE
    hu[(yy >= 125.0) & (yy <= 135.0) & (np.abs(xx) <= 170.0)] = TABLE
    enclosed_air = np.zeros(zz.shape, dtype=bool)
    if outside_air:  # a positioning ring 5 mm thick, 12 mm off the skin: the air between is no lung
        radius = np.sqrt((xx / 172.0) ** 2 + (yy / 122.0) ** 2)
        ring = (radius >= 1.0) & (radius <= 1.03)
        hu[ring] = SOFT_TISSUE
        enclosed_air = ~body & (radius < 1.0)

    masks = {}
    for side, sign in (("right", -1.0), ("left", 1.0)):
        centre = np.array([sign * LUNG_CENTRE_X_MM, 5.0, 0.0])
        masks[side] = (((points - centre) / LUNG_SEMI_MM) ** 2).sum(axis=-1) <= 1.0
    carina = np.array([0.0, -10.0, 45.0])
    airway = _segment_distance(points, carina, np.array([0.0, -10.0, 400.0])) <= 9.0
    for side, sign in (("right", -1.0), ("left", 1.0)):
        if side in lungs:
            airway |= _segment_distance(points, carina, np.array([sign * (LUNG_CENTRE_X_MM - 15.0), 0.0, 15.0])) <= 6.0
    airway &= body
    for side in masks:
        masks[side] &= ~airway
        if side not in lungs:
            masks[side][:] = False
    lung = masks["right"] | masks["left"]
    hu[lung] = PARENCHYMA
    hu[airway] = AIR

    vessels = np.zeros(zz.shape, dtype=bool)
    for side, sign in (("right", -1.0), ("left", 1.0)):
        for dx, vy in VESSEL_OFFSETS_MM:
            start = np.array([sign * LUNG_CENTRE_X_MM + dx, vy, -60.0])
            vessels |= _segment_distance(points, start, start + np.array([0.0, 0.0, 110.0])) <= 3.0
    vessels &= lung
    hu[vessels] = SOFT_TISSUE

    for lesion in lesions:
        sign = -1.0 if lesion.side == "right" else 1.0
        zone_z = ZONE_CENTRE_Z_MM[lesion.zone]
        if lesion.posterior_y_mm is None:
            centre = np.array([sign * LUNG_CENTRE_X_MM + 15.0, -20.0, zone_z])
            region = np.linalg.norm(points - centre, axis=-1) <= lesion.radius_mm
        else:
            region = (yy > lesion.posterior_y_mm) & (np.abs(zz - zone_z) <= 100.0 / 3)
        region &= masks[lesion.side]
        hu[region] = lesion.hu
        vessels &= ~region

    gas = np.zeros(zz.shape, dtype=bool)
    if bowel_gas:  # anterior abdominal loops below the lungs
        for cx, cy, cz, r in ((-40.0, -50.0, -150.0, 22.0), (45.0, -60.0, -170.0, 18.0), (0.0, -75.0, -200.0, 25.0)):
            gas |= np.linalg.norm(points - np.array([cx, cy, cz]), axis=-1) <= r
        gas &= body & ~lung
        hu[gas] = AIR
    material = hu.copy()
    hu += np.random.default_rng(seed).normal(0.0, noise_hu, hu.shape).astype(np.float32)
    volume = Volume(np.round(hu).clip(-1024, 3071).astype(np.int16), spacing, tuple(origin), np.eye(3))
    return ChestCase(volume, masks["right"], masks["left"], vessels, material, gas, enclosed_air)


def true_zone(case: ChestCase, side: str) -> list[np.ndarray]:
    """Truth zones of a lung: thirds of its own visible cranio-caudal extent (upper, middle, lower)."""
    mask = case.right_lung if side == "right" else case.left_lung
    z = case.volume.index_to_lps(np.array([[0.0, 0.0, float(k)] for k in range(mask.shape[0])]))[:, 2]
    present = z[mask.any(axis=(1, 2))]
    top, bottom = present.max(), present.min()
    third = (top - bottom) / 3
    upper, lower = z > top - third, z < bottom + third
    zones = []
    for selection in (upper, ~upper & ~lower, lower):
        zone = np.zeros_like(mask)
        zone[selection] = mask[selection]
        zones.append(zone)
    return zones


def true_percent(case: ChestCase, region: np.ndarray, low: float, high: float) -> float:
    """Percentage of the region's parenchyma (vessels excluded) whose noise-free HU lies in [low, high)."""
    parenchyma = region & ~case.vessels
    values = case.material[parenchyma]
    return 100.0 * float(np.count_nonzero((values >= low) & (values < high))) / max(1, values.size)

"""Lung involvement on CT by density: HU bands, opacity percentages and a 6-zone severity score.

Quantification, not a diagnosis (`DISCLAIMER`): the figures say how much lung
lies in each density band; ground-glass and consolidation densities have many
causes besides COVID-19 pneumonia, and no model is involved.

Inside the lung mask of an earlier step (airways already left out by it):

1. vessels: with `vessels: exclude` (default), opacity (voxels at or above the
   ground-glass band's low edge) thinner than `vessel_max_diameter_mm` is a
   vessel or a bronchial wall and leaves the quantified parenchyma (a binary
   opening keeps what a ball of that diameter fits in: lesions); `count` keeps
   vessels in the bands, where non-contrast vessels (+40 HU) add to
   consolidation, as plain histogram methods do;
2. bands: volume and percentage of the parenchyma in emphysema, normally
   aerated, ground-glass and consolidation bands (`InvolvementParameters`);
   opacity = ground-glass + consolidation, high opacity = consolidation;
3. zones: each lung in thirds of its own cranio-caudal extent (upper, middle,
   lower), 6 zones; a zone scores 0 (no opacity), 1 (< 25 %), 2 (25-50 %),
   3 (50-75 %), 4 (>= 75 %), the 5-step scale of Chung et al. (Radiology 2020)
   per zone; total 0-24; category none / mild / moderate / severe by the
   configured cut-offs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from inference import transforms
from inference.lung import LEFT_LUNG, RIGHT_LUNG
from inference.parameters import InvolvementParameters
from inference.results import Algorithm, Code, LabelMap, SegmentLabel
from inference.volume import Volume

DISCLAIMER = ("Quantification of lung density, not a diagnosis: ground-glass and consolidation densities "
              "have many causes; to be read by a physician with the images.")
MORPHOLOGICALLY_ABNORMAL = Code("49755003", "SCT", "Morphologically Abnormal Structure")
GROUND_GLASS = SegmentLabel(1, "Ground-glass opacity", MORPHOLOGICALLY_ABNORMAL,
                            Code("112120", "DCM", "Ground glass opacity"))
CONSOLIDATION = SegmentLabel(2, "Consolidation", MORPHOLOGICALLY_ABNORMAL,
                             Code("95436008", "SCT", "Lung consolidation"))
ALGORITHM = Algorithm(
    name="dicom-node lung involvement",
    version="1",
    family=Code("123104", "DCM", "Morphological Operations"),  # PS3.16 CID 7162
    source="HU bands inside the lung mask, 6-zone score",
)
BANDS = ("emphysema", "normal", "ground_glass", "consolidation")
ZONES = ("upper", "middle", "lower")
CATEGORIES = ("none", "mild", "moderate", "severe", "not assessed")  # not assessed: no lung found


@dataclass(frozen=True)
class BandMeasure:
    """Parenchyma in one HU band [low, high)."""

    band: str  # one of BANDS
    low_hu: float
    high_hu: float
    volume_ml: float
    percent: float  # of the region's quantified parenchyma


@dataclass(frozen=True)
class RegionInvolvement:
    """Figures of one lung (zone None) or of one zone of a lung."""

    lung: SegmentLabel  # RIGHT_LUNG or LEFT_LUNG
    zone: str | None  # one of ZONES, None for the whole lung
    volume_ml: float  # the lung mask's volume in the region
    vessel_ml: float  # left out of the quantified parenchyma (0 with `vessels: count`)
    mean_hu: float | None  # mean density of the quantified parenchyma (None: the region holds none)
    bands: tuple[BandMeasure, ...]
    opacity_percent: float  # ground-glass + consolidation
    high_opacity_percent: float  # consolidation
    score: int | None  # 0-4 for a zone, None for a whole lung

    @property
    def name(self) -> str:
        side = "right" if self.lung.value == RIGHT_LUNG.value else "left"
        return f"{side} lung" if self.zone is None else f"{side} {self.zone} zone"


@dataclass(frozen=True)
class LungInvolvement:
    """The step's result: per lung, per zone, the total score and category, and the opacity label map."""

    lungs: tuple[RegionInvolvement, ...]  # the lungs found, right first
    zones: tuple[RegionInvolvement, ...]  # 3 per lung found, upper first
    total_score: int  # sum of the zone scores (0-24 with both lungs)
    category: str  # one of CATEGORIES
    opacities: LabelMap  # 1 ground-glass, 2 consolidation, on the lungs' grid
    parameters: InvolvementParameters
    disclaimer: str = DISCLAIMER

    @property
    def complete(self) -> bool:
        """Both lungs found: a total out of 24 (a partial scan scores only the zones it holds)."""
        return len(self.lungs) == 2

    def as_json(self) -> dict:
        def region(r: RegionInvolvement) -> dict:
            return {"region": r.name, "volume_ml": r.volume_ml, "vessel_ml": r.vessel_ml, "mean_hu": r.mean_hu,
                    "opacity_percent": r.opacity_percent, "high_opacity_percent": r.high_opacity_percent,
                    "bands": {b.band: {"low_hu": b.low_hu, "high_hu": b.high_hu, "volume_ml": b.volume_ml,
                                       "percent": b.percent} for b in r.bands},
                    **({"score": r.score} if r.score is not None else {})}
        return {"disclaimer": self.disclaimer, "total_score": self.total_score, "max_score": 4 * len(self.zones),
                "category": self.category, "lungs": [region(r) for r in self.lungs],
                "zones": [region(r) for r in self.zones]}


def zone_score(opacity_percent: float) -> int:
    """0: none; 1: < 25 %; 2: 25-50 %; 3: 50-75 %; 4: >= 75 %."""
    if opacity_percent <= 0:
        return 0
    return 1 + sum(int(opacity_percent >= edge) for edge in (25.0, 50.0, 75.0))


def category(total: int, p: InvolvementParameters) -> str:
    if total == 0:
        return "none"
    return "mild" if total <= p.mild_max_score else "moderate" if total <= p.moderate_max_score else "severe"


def quantify_involvement(volume: Volume, lungs: LabelMap,
                         parameters: InvolvementParameters = InvolvementParameters()) -> LungInvolvement:
    """Measure `volume` (HU) inside `lungs` (label 1 right, 2 left, as `inference.lung` makes them)."""
    if not lungs.volume.same_grid(volume):
        raise ValueError("the lung mask is not on the grid of the CT volume")
    labels = np.asarray(lungs.volume.array)
    hu = np.asarray(volume.array)
    opacities = np.zeros(labels.shape, dtype=np.uint8)
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    per_lung, per_zone = [], []
    for lung in (RIGHT_LUNG, LEFT_LUNG):
        box = transforms.bounding_box(labels == lung.value)
        if box is None:
            continue
        mask = labels[box] == lung.value
        values = hu[box].astype(np.float32)
        vessels = _vessels(mask, values, volume, parameters)
        parenchyma = mask & ~vessels
        band_of = band_index(values, parameters)
        opacity_view = opacities[box]
        opacity_view[parenchyma & (band_of == 2)] = GROUND_GLASS.value
        opacity_view[parenchyma & (band_of == 3)] = CONSOLIDATION.value
        per_lung.append(_region(lung, None, mask, vessels, values, band_of, voxel_ml, parameters))
        slices = _zone_slices(mask, volume, box)
        for zone, zone_k in zip(ZONES, slices):
            zone_mask = np.zeros_like(mask)
            zone_mask[zone_k] = mask[zone_k]
            per_zone.append(_region(lung, zone, zone_mask, vessels & zone_mask, values, band_of, voxel_ml, parameters))
    total = sum(z.score for z in per_zone)
    return LungInvolvement(tuple(per_lung), tuple(per_zone), total,
                           category(total, parameters) if per_zone else "not assessed",
                           LabelMap(volume.with_array(opacities), (GROUND_GLASS, CONSOLIDATION), ALGORITHM),
                           parameters)


def band_index(values: np.ndarray, p: InvolvementParameters) -> np.ndarray:
    """Index into BANDS of each voxel's band; -1 outside every band."""
    index = np.full(values.shape, -1, dtype=np.int8)
    for i, (low, high) in enumerate((p.emphysema_hu, p.normal_hu, p.ground_glass_hu, p.consolidation_hu)):
        index[(values >= low) & (values < high)] = i
    return index


def _vessels(mask: np.ndarray, values: np.ndarray, volume: Volume, p: InvolvementParameters) -> np.ndarray:
    """Thin opacity (vessels, bronchial walls): opacity that no ball of the vessel diameter fits in.

    A binary opening with a Euclidean ball of radius d/2 in mm (anisotropic
    voxels handled), made of two distance maps instead of a structuring
    element (a 15x15x11 voxel ball took 80 s on a lung's box of a 0.7 mm CT).
    The maps are computed on a grid coarsened to about d/5 per voxel (block
    majority), which moves the edge of what is kept by at most one coarse
    voxel; a finer CT costs no more than that grid.
    """
    if p.vessels == "count" or p.vessel_max_diameter_mm <= 0:
        return np.zeros(mask.shape, dtype=bool)
    dense = mask & (values >= p.ground_glass_hu[0])
    if not dense.any():
        return dense
    radius = p.vessel_max_diameter_mm / 2
    spacing_kji = np.asarray(volume.spacing, dtype=np.float64)[::-1]
    factors = np.maximum(1, np.floor(radius / 2.5 / spacing_kji)).astype(int)
    coarse = _block_majority(dense, factors)
    coarse_spacing = tuple(float(s) for s in (spacing_kji * factors)[::-1])
    core = -_distance_mm(~coarse, coarse_spacing) > radius  # farther than the radius from any background voxel
    kept = _distance_mm(core, coarse_spacing) >= -radius if core.any() else core  # within the radius of the core
    for axis, factor in enumerate(factors):
        kept = np.repeat(kept, factor, axis=axis)
    return dense & ~kept[: dense.shape[0], : dense.shape[1], : dense.shape[2]]


def _block_majority(mask: np.ndarray, factors: np.ndarray) -> np.ndarray:
    """`mask` on a grid `factors` times coarser: a block is set when half its voxels are (edges padded)."""
    if (factors == 1).all():
        return mask
    padded = np.pad(mask, [(0, -n % f) for n, f in zip(mask.shape, factors)])
    k, j, i = (n // f for n, f in zip(padded.shape, factors))
    blocks = padded.reshape(k, factors[0], j, factors[1], i, factors[2])
    return blocks.mean(axis=(1, 3, 5), dtype=np.float32) >= 0.5


def _distance_mm(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Signed Euclidean distance in mm to the nearest voxel of `mask`: negative outside it, >= 0 inside."""
    image = sitk.GetImageFromArray(mask.astype(np.uint8))
    image.SetSpacing(spacing)
    return sitk.GetArrayFromImage(sitk.SignedMaurerDistanceMap(image, True, False, True))


def _zone_slices(mask: np.ndarray, volume: Volume, box: tuple[slice, ...]) -> list[np.ndarray]:
    """Boolean slice selections (over the box's k axis) of the upper, middle and lower third of the lung.

    Thirds of the lung's own cranio-caudal extent, in LPS z (superior +z,
    PS3.3 C.7.6.2.1.1), whatever the slice order of the series.
    """
    ks = np.flatnonzero(mask.any(axis=(1, 2))) + box[0].start
    centre_ij = [(s.start + s.stop - 1) / 2 for s in box[1:][::-1]]
    z = volume.index_to_lps(np.array([[*centre_ij, float(k)] for k in range(box[0].start, box[0].stop)]))[:, 2]
    top, bottom = z[ks - box[0].start].max(), z[ks - box[0].start].min()
    third = (top - bottom) / 3.0
    upper = z > top - third
    lower = z < bottom + third
    return [upper, ~upper & ~lower, lower]


def _region(lung: SegmentLabel, zone: str | None, mask: np.ndarray, vessels: np.ndarray, values: np.ndarray,
            band_of: np.ndarray, voxel_ml: float, p: InvolvementParameters) -> RegionInvolvement:
    parenchyma = mask & ~vessels
    count = int(np.count_nonzero(parenchyma))
    counts = np.bincount(band_of[parenchyma].astype(np.int64) + 1, minlength=len(BANDS) + 1)[1:]
    percent = [100.0 * int(c) / count if count else 0.0 for c in counts]
    edges = (p.emphysema_hu, p.normal_hu, p.ground_glass_hu, p.consolidation_hu)
    bands = tuple(BandMeasure(name, float(low), float(high), int(c) * voxel_ml, pc)
                  for name, (low, high), c, pc in zip(BANDS, edges, counts, percent))
    opacity = percent[2] + percent[3]
    return RegionInvolvement(
        lung=lung, zone=zone, volume_ml=float(np.count_nonzero(mask)) * voxel_ml,
        vessel_ml=float(np.count_nonzero(vessels)) * voxel_ml,
        mean_hu=float(values[parenchyma].mean()) if count else None,
        bands=bands, opacity_percent=opacity, high_opacity_percent=percent[3],
        score=zone_score(opacity if counts[2] + counts[3] else 0.0) if zone is not None else None)

"""Options of the built-in (model-free) steps: the lung segmentation and the lung involvement.

Kept apart from the algorithms, with no numpy or SimpleITK import, so the
node's configuration can validate a step's `options:` when config.yaml loads,
not when the first study arrives. `from_options` turns a config mapping into
the typed parameters and says which key is wrong and why.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Literal


def _from_options(defaults, options: dict[str, Any] | None):
    """`defaults` with the keys of `options` replaced; unknown keys and wrong types are errors."""
    known = {f.name: f for f in fields(defaults)}
    options = dict(options or {})
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    changes = {}
    for name, value in options.items():
        current = getattr(defaults, name)
        if isinstance(current, bool):
            if not isinstance(value, bool):
                raise ValueError(f"option {name}: expected true or false, got {value!r}")
        elif isinstance(current, (int, float)) and not isinstance(current, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"option {name}: expected a number, got {value!r}")
            if isinstance(current, int) and not float(value).is_integer():
                raise ValueError(f"option {name}: expected a whole number, got {value!r}")
            value = type(current)(value)
        elif isinstance(current, tuple):
            if not isinstance(value, (list, tuple)) or len(value) != len(current) or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise ValueError(f"option {name}: expected a list of {len(current)} numbers, got {value!r}")
            value = tuple(float(v) for v in value)
        elif isinstance(current, str) and not isinstance(value, str):
            raise ValueError(f"option {name}: expected text, got {value!r}")
        changes[name] = value
    return replace(defaults, **changes)


@dataclass(frozen=True)
class LungParameters:
    """Options of `task: lung_classical`; defaults suit adult CT in HU, also when the lungs are cut off.

    `min_lung_ml` is small on purpose: the lung bases an abdominal CT catches
    hold 40-70 mL each, the apices of a neck CT less; bowel gas and air outside
    the body are refused by position and density, not by size.
    """

    body_hu: float = -500.0  # body: above this, largest component
    air_hu: float = -320.0  # lung and airway air: below this, inside the body
    min_lung_ml: float = 20.0  # smaller air components are never a lung
    parenchyma_hu: tuple[float, float] = (-980.0, -600.0)  # a lung's mean HU lies in this range
    exclude_airways: bool = True  # trachea and main bronchi are tracked and left out of the lungs
    max_airway_area_mm2: float = 800.0  # a trachea/bronchus cross-section is smaller than this
    airway_search_mm: float = 30.0  # the trachea starts this close to the body's midline
    max_split_erosions: int = 8  # in-plane erosions tried to part lungs that touch
    fill_vessels: bool = True  # holes of each lung (vessels) filled slice by slice
    closing_mm: float = 0.0  # smoothing: a binary closing of each lung with this radius (0: none)

    def __post_init__(self) -> None:
        if not self.parenchyma_hu[0] < self.parenchyma_hu[1]:
            raise ValueError(f"option parenchyma_hu: low must be below high, got {list(self.parenchyma_hu)}")
        for name in ("min_lung_ml", "max_airway_area_mm2", "airway_search_mm", "closing_mm"):
            if getattr(self, name) < 0:
                raise ValueError(f"option {name}: must not be negative, got {getattr(self, name)}")
        if self.max_split_erosions < 0:
            raise ValueError(f"option max_split_erosions: must not be negative, got {self.max_split_erosions}")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> LungParameters:
        return _from_options(cls(), options)


@dataclass(frozen=True)
class InvolvementParameters:
    """Options of `task: lung_involvement`: HU bands, vessel handling, score and category cut-offs.

    Bands are half-open [low, high) in HU; their defaults are the published ones
    (README, "Lung involvement"): emphysema below -950 HU (Gevenois et al., Am J
    Respir Crit Care Med 1996), normally aerated -950..-700 HU (Colombi et al.,
    Radiology 2020), ground-glass -700..-300 HU and consolidation -300..+50 HU
    (the -300 HU split of Chen et al., BMC Infect Dis 2021).
    """

    emphysema_hu: tuple[float, float] = (-1024.0, -950.0)
    normal_hu: tuple[float, float] = (-950.0, -700.0)
    ground_glass_hu: tuple[float, float] = (-700.0, -300.0)
    consolidation_hu: tuple[float, float] = (-300.0, 50.0)
    # Vessels: opacity (>= ground-glass low) thinner than this diameter is a vessel or a bronchial wall, not
    # disease, and is left out of the quantified parenchyma (morphological opening); `vessels: count` keeps
    # them in the bands (non-contrast vessels then add to consolidation).
    vessel_max_diameter_mm: float = 10.0
    # Category from the 0-24 total score: none (0), mild (<= mild_max), moderate (<= moderate_max), severe.
    mild_max_score: int = 8
    moderate_max_score: int = 16
    vessels: Literal["exclude", "count"] = "exclude"

    def __post_init__(self) -> None:
        bands = [self.emphysema_hu, self.normal_hu, self.ground_glass_hu, self.consolidation_hu]
        for name, band in zip(("emphysema_hu", "normal_hu", "ground_glass_hu", "consolidation_hu"), bands):
            if not band[0] < band[1]:
                raise ValueError(f"option {name}: low must be below high, got {list(band)}")
        for before, after in zip(bands, bands[1:]):
            if before[1] > after[0]:
                raise ValueError(f"HU bands overlap: {list(before)} and {list(after)}")
        if self.vessels not in ("exclude", "count"):
            raise ValueError(f"option vessels: exclude or count, got {self.vessels!r}")
        if self.vessel_max_diameter_mm < 0:
            raise ValueError(f"option vessel_max_diameter_mm: must not be negative, got {self.vessel_max_diameter_mm}")
        if not 0 <= self.mild_max_score <= self.moderate_max_score <= 24:
            raise ValueError("options mild_max_score <= moderate_max_score must lie within 0..24")

    @classmethod
    def from_options(cls, options: dict[str, Any] | None) -> InvolvementParameters:
        return _from_options(cls(), options)


PARAMETERS = {"lung_classical": LungParameters, "lung_involvement": InvolvementParameters}

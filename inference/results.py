"""What the model side hands back to the node: typed, DICOM-free results.

The node encodes these as DICOM (SEG for label maps, SR for class
probabilities); this module only says what was found, on which grid, by which
algorithm, with the codes a PACS user will read.
"""

from __future__ import annotations

from dataclasses import dataclass

from inference.volume import Volume


@dataclass(frozen=True)
class Code:
    """A coded concept (value, coding scheme designator, meaning), e.g. SNOMED CT."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class Algorithm:
    """Identification of the algorithm that produced a result (PS3.3 C.8.20.2 Algorithm Identification)."""

    name: str
    version: str
    family: Code = Code("123110", "DCM", "Artificial Intelligence")
    source: str = ""


@dataclass(frozen=True)
class SegmentLabel:
    """One label value of a label map and what it means."""

    value: int
    name: str
    category: Code
    type: Code


@dataclass(frozen=True, eq=False)
class LabelMap:
    """A segmentation on the source grid: `volume.array` is uint8, 0 = background."""

    volume: Volume
    segments: tuple[SegmentLabel, ...]
    algorithm: Algorithm


@dataclass(frozen=True)
class ClassLabel:
    """One output class of a classifier; `code` is the finding reported when it wins."""

    name: str
    code: Code | None = None


@dataclass(frozen=True)
class ClassProbabilities:
    """Softmax output of a classifier, one probability per class, in the model's order."""

    classes: tuple[ClassLabel, ...]
    probabilities: tuple[float, ...]
    algorithm: Algorithm

    def __post_init__(self) -> None:
        if len(self.classes) != len(self.probabilities):
            raise ValueError(
                f"{len(self.classes)} classes but {len(self.probabilities)} probabilities"
            )

    @property
    def winner(self) -> ClassLabel:
        best = max(range(len(self.probabilities)), key=self.probabilities.__getitem__)
        return self.classes[best]

"""What every destination kind answers: one Outcome per instance, with a typed refusal.

A destination kind (DIMSE C-STORE in `dicom_node.dispatch.dimse`, DICOMweb STOW-RS in
`dicom_node.dispatch.dicomweb`; `dicom_node.dispatch.registry`
keeps the registry of kinds by name) sends files and says, per instance,
whether it was stored and, if not, whether trying again can help. What then
happens (the retry schedule, the dead letter, the overlay fallback) is the
same for every kind, decided by `config.RetryPolicy` and `dicom_node.dispatch.exports`
from these values alone, never from the wording of a reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from dicom_node.config.destinations import AnyDestination as DestinationConfig


class OutcomeKind(StrEnum):
    """Stored (with or without a warning), or not: transient (a later try may succeed: the retry policy
    decides when) or permanent (the same request would get the same answer: dead-lettered at once)."""

    SENT = "sent"
    WARNING = "warning"
    TRANSIENT = "transient"
    PERMANENT = "permanent"

    @property
    def stored(self) -> bool:
        return self in (OutcomeKind.SENT, OutcomeKind.WARNING)


class Refusal(StrEnum):
    """Why a destination refused an instance, where the node acts on the why (not only on the kind)."""

    # PS3.4 Table B.2-1 0x0122, or no presentation context accepted for the SOP class (PS3.8 9.3.3.2):
    # a pipeline that makes an overlay series sends it instead of the SEG.
    SOP_CLASS_NOT_SUPPORTED = "sop_class_not_supported"


@dataclass(frozen=True)
class Outcome:
    sop_instance_uid: str
    # The PS3.4 status of this instance: the C-STORE response's (PS3.7 C.4.2), or a STOW-RS response's
    # FailureReason or WarningReason (0x0000 when stored); None when no answer was about this instance.
    status: int | None
    kind: OutcomeKind
    reason: str  # for people: the log, the journal's export row, the audit
    refusal: Refusal | None = None  # for the node: why it was refused, when that decides what to do next


@dataclass(frozen=True)
class DispatchReport:
    destination: str
    outcomes: tuple[Outcome, ...]

    @property
    def all_sent(self) -> bool:
        return all(o.kind.stored for o in self.outcomes)


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    status: int | None  # the C-ECHO response status, or the HTTP status of the QIDO-RS query
    reason: str
    check: str = "C-ECHO"  # what was sent: a C-ECHO (PS3.4 Annex A), or a QIDO-RS query for DICOMweb


class DestinationKind(Protocol):
    """One kind of destination, registered by `name` in `dicom_node.dispatch.registry.KINDS` and chosen by a
    destination's `kind` in the config."""

    name: ClassVar[str]

    def send(self, destination: DestinationConfig, paths: Sequence[Path], calling_ae: str,
             on_outcome: Callable[[Outcome], None] | None = None) -> DispatchReport:
        """Send every file; each gets exactly one Outcome, passed to `on_outcome` as it is decided."""

    def echo(self, destination: DestinationConfig, calling_ae: str) -> EchoResult:
        """Check that the destination is reachable and accepts us."""

    def describe(self, destination: DestinationConfig) -> str:
        """How the destination is named in reports and logs (for DIMSE: AE@host:port)."""

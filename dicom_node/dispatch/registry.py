"""Dispatch: result and forwarded instances to a configured destination, through the kind it names.

A destination's `kind` in the config (default `dimse`) picks its implementation
from `KINDS` (`dimse`: C-STORE, `dicomweb`: STOW-RS); adding a kind is adding a module
with a `destinations.DestinationKind` class, its line here and its config model in
`dicom_node.config.destinations.DESTINATION_KINDS`. Every kind
answers in the same `destinations.Outcome` values, so the retry policy, the
dead letter and the overlay fallback (`dicom_node.dispatch.exports`) are one mechanism
for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from dicom_node.config.destinations import AnyDestination
from dicom_node.dispatch.destinations import DestinationKind, DispatchReport, EchoResult, Outcome
from dicom_node.dispatch.dicomweb import Dicomweb
from dicom_node.dispatch.dimse import Dimse

KINDS: dict[str, DestinationKind] = {kind.name: kind() for kind in (Dimse, Dicomweb)}


def kind_of(destination: AnyDestination) -> DestinationKind:
    """The implementation of `destination.kind` (dicom_node.config.destinations accepts only registered
    names)."""
    return KINDS[destination.kind]


def send(destination: AnyDestination, paths: Sequence[Path], calling_ae: str,
         on_outcome: Callable[[Outcome], None] | None = None) -> DispatchReport:
    """Send every file to `destination`; each gets exactly one Outcome (`on_outcome` sees each as it is
    decided: the CLI's progress bar)."""
    return kind_of(destination).send(destination, paths, calling_ae, on_outcome)


def echo(destination: AnyDestination, calling_ae: str) -> EchoResult:
    """Check that `destination` is reachable and accepts us (DIMSE: C-ECHO, PS3.4 Annex A; DICOMweb: a
    QIDO-RS query)."""
    return kind_of(destination).echo(destination, calling_ae)

"""Deterministic UIDs for the objects a job writes.

A job that is re-run (after a crash, or by an admin) must write the *same*
SeriesInstanceUID and SOPInstanceUIDs again: the PACS then replaces the first
copy instead of storing a duplicate series. So every result UID is derived from
what identifies the job's output — the source series, its generation, the
pipeline, the kind of output and an index — never from the clock or a random
source.

Under a configured organisation root the UID is `<org_root>.<digits of a
SHA-256 of the key>`, cut to fit 64 characters. Without one it is the
`2.25.<integer of a name-based UUID>` form of PS3.5 B.2, which needs no
registered root.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass

MAX_UID_LENGTH = 64  # PS3.5 9.1
_UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
# Fixed namespace so that the 2.25 UIDs are stable across installations.
_NAMESPACE = uuid.UUID("8f0d6c3e-5b7a-5c1e-9a57-2b9d1f3c6e41")
# Digits kept after an org root: enough that collisions never matter (>= 96 bits).
_MIN_SUFFIX_DIGITS = 30


class UidError(ValueError):
    """An org root or derived UID that breaks PS3.5 9.1."""


def validate_uid(uid: str) -> str:
    """Return `uid` if it is a valid UID (PS3.5 9.1: digits and dots, no leading zeros, <= 64 chars)."""
    if len(uid) > MAX_UID_LENGTH:
        raise UidError(f"UID {uid!r} is {len(uid)} characters long, the limit is {MAX_UID_LENGTH} (PS3.5 9.1)")
    if not _UID_PATTERN.match(uid):
        raise UidError(f"UID {uid!r} is not dot-separated numbers without leading zeros (PS3.5 9.1)")
    return uid


def derive_uid(org_root: str | None, *key: object) -> str:
    """The UID for `key` under `org_root` (or the 2.25 root when None); same key, same UID."""
    text = "\x1f".join(str(part) for part in key)
    if org_root is None:
        return validate_uid(f"2.25.{uuid.uuid5(_NAMESPACE, text).int}")
    root = validate_uid(org_root.rstrip("."))
    room = MAX_UID_LENGTH - len(root) - 1
    if room < _MIN_SUFFIX_DIGITS:
        raise UidError(
            f"org_root {org_root!r} is {len(root)} characters long: it leaves {room} digits for the "
            f"derived part, at least {_MIN_SUFFIX_DIGITS} are needed within 64 characters"
        )
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest(), "big")
    return validate_uid(f"{root}.{digest % 10**room}")


@dataclass(frozen=True)
class UidSeed:
    """What identifies one job's output; every UID the job writes is derived from it."""

    series_instance_uid: str
    generation: int
    pipeline: str
    org_root: str | None = None

    def series_uid(self, kind: str) -> str:
        """SeriesInstanceUID of the output series of `kind` ("seg", "sr", "overlay")."""
        return derive_uid(self.org_root, self.series_instance_uid, self.generation, self.pipeline, kind, "series")

    def instance_uid(self, kind: str, index: int = 0) -> str:
        """SOPInstanceUID of instance `index` of the output series of `kind`."""
        return derive_uid(
            self.org_root, self.series_instance_uid, self.generation, self.pipeline, kind, "instance", index
        )

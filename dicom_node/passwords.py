"""Password hashes for the console's admin users: scrypt (RFC 7914) from the standard library.

A hash is one string, `scrypt$<n>$<r>$<p>$<salt>$<key>` (salt and key in
base64), so config.yaml holds it as a plain value and the cost parameters
travel with it: a hash made with stronger parameters later still verifies
beside older ones. `dicom-node hash-password` prints one.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

SCHEME = "scrypt"
# n=2**15, r=8: about 32 MiB and some 50-100 ms a check on a server CPU (OWASP's scrypt floor is n=2**17 with
# r=8 p=1 *or* an equivalent; this is the cost one login may take on a busy node).
COST = (2**15, 8, 1)
_KEY_BYTES = 32


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * r * n * p + 2**20,
                          dklen=_KEY_BYTES)


def hash_password(password: str, cost: tuple[int, int, int] = COST) -> str:
    """A new hash of `password` with a random 16-byte salt."""
    if not password:
        raise ValueError("an empty password cannot be hashed")
    n, r, p = cost
    salt = os.urandom(16)
    return "$".join((SCHEME, str(n), str(r), str(p), _b64(salt), _b64(_scrypt(password, salt, n, r, p))))


def parse_hash(value: str) -> tuple[int, int, int, bytes, bytes]:
    """(n, r, p, salt, key) of a hash string; ValueError naming what is wrong with it."""
    parts = value.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise ValueError(f"not a password hash of the form {SCHEME}$n$r$p$salt$key (make one with "
                         "`dicom-node hash-password`)")
    try:
        n, r, p = (int(part) for part in parts[1:4])
        salt, key = base64.b64decode(parts[4], validate=True), base64.b64decode(parts[5], validate=True)
    except ValueError:
        raise ValueError("the password hash's parameters or base64 fields do not parse") from None
    if n < 2**14 or n & (n - 1) or r < 1 or p < 1 or len(salt) < 16 or len(key) != _KEY_BYTES:
        raise ValueError("the password hash's parameters are too weak or malformed (n a power of two >= 16384, "
                         f"salt >= 16 bytes, key {_KEY_BYTES} bytes)")
    return n, r, p, salt, key


def verify_password(password: str, stored: str) -> bool:
    """Whether `password` is the one `stored` was made from (constant-time comparison)."""
    n, r, p, salt, key = parse_hash(stored)
    return hmac.compare_digest(_scrypt(password, salt, n, r, p), key)

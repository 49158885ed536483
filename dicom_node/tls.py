"""DICOM TLS (PS3.15 B.9, the BCP 195 TLS Secure Transport Connection Profile): TLS 1.2 or later.

The node listens for TLS on its own port beside the plain one (2762 is the
port registered for DICOM over TLS) and asks senders for a certificate signed
by the CA the admin names, because the DICOM TLS profiles authenticate both
ends; a destination can be reached over TLS with the node's own certificate.
Cipher suites are Python's defaults for TLS 1.2+, which meet BCP 195 (forward
secret AEAD suites, no RC4, no SHA-1, no export or anonymous suites).
"""

from __future__ import annotations

import ssl
from pathlib import Path


def server_context(certificate: Path, private_key: Path, ca_certificates: Path | None,
                   require_client_certificate: bool) -> ssl.SSLContext:
    """The listener's context; raises OSError or ssl.SSLError when the files are unusable."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certificate, private_key)
    if ca_certificates is not None:
        context.load_verify_locations(ca_certificates)
    context.verify_mode = (ssl.CERT_REQUIRED if require_client_certificate
                           else ssl.CERT_OPTIONAL if ca_certificates is not None else ssl.CERT_NONE)
    return context


def client_context(ca_certificates: Path | None, certificate: Path | None, private_key: Path | None,
                   check_hostname: bool) -> ssl.SSLContext:
    """A context for associations to a destination: its certificate must chain to `ca_certificates`
    (the system's trust store when None); ours is presented when given."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_certificates)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname  # DICOM peers are mostly configured by address, not by name
    if certificate is not None and private_key is not None:
        context.load_cert_chain(certificate, private_key)
    return context


def peer_subject(sock: ssl.SSLSocket) -> str:
    """The peer certificate's subject common name, for logs ('' without a certificate)."""
    certificate = sock.getpeercert() or {}
    for rdn in certificate.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return value
    return ""

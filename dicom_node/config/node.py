"""The node's own sections: `node` (the DICOM listener, its TLS and SOP classes), `http` (the status API
and STOW-RS receive), `security` (calling AEs), `completion` and `retention`."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from dicom_node import sop_classes, tls
from dicom_node.config.base import LOOPBACK_HOSTS, _Model, _resolve, _TlsFiles
from dicom_node.config.console import ConsoleConfig


class NodeTlsConfig(_TlsFiles):
    """A DICOM TLS listener beside the plain port (dicom_node.tls). Senders must present a certificate
    that chains to `ca_certificates` unless `require_client_certificate` is false."""

    port: int = Field(2762, ge=1, le=65535)
    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None
    require_client_certificate: bool = True

    @model_validator(mode="before")
    @classmethod
    def _client_certificates_need_a_ca(cls, values: Any) -> Any:
        if isinstance(values, dict) and values.get("require_client_certificate", True) \
                and values.get("ca_certificates") is None:
            raise ValueError("require_client_certificate needs ca_certificates (the CA that signs the senders' "
                             "certificates)")
        return values

    def contexts(self) -> list[ssl.SSLContext]:
        return [tls.server_context(self.certificate, self.private_key, self.ca_certificates,
                                   self.require_client_certificate)]


class SopClassFilter(_Model):
    """Which storage SOP classes the node accepts (dicom_node.sop_classes): `allow` None accepts every
    standard storage class; entries are keywords (CTImageStorage) or UIDs, stored resolved to UIDs."""

    allow: list[str] | None = None
    deny: list[str] = []

    @field_validator("allow", "deny")
    @classmethod
    def _resolved(cls, values: list[str] | None) -> list[str] | None:
        if values is None:
            return None
        resolved, problems = [], []
        for value in values:
            try:
                resolved.append(sop_classes.resolve(value))
            except ValueError as error:
                problems.append(str(error))
        if problems:
            raise ValueError("; ".join(problems))
        return resolved

    @model_validator(mode="after")
    def _something_left(self) -> SopClassFilter:
        if not sop_classes.accepted_classes(self.allow, self.deny):
            raise ValueError("allow and deny leave no storage SOP class to accept")
        return self


class NodeConfig(_Model):
    # This node's identity among the nodes sharing a PostgreSQL journal (its leases, heartbeat and
    # singletons); None: "<host>:<pid>". A stable name lets a restarted node take its own jobs back at once.
    name: str | None = Field(None, min_length=1, max_length=64)
    ae_title: str = Field("DICOMNODE", min_length=1, max_length=16)  # PS3.5 6.2: AE is at most 16 chars
    host: str = "0.0.0.0"
    port: int = Field(11112, ge=1, le=65535)
    storage_dir: Path = Path("var")
    journal_url: str | None = None  # None: sqlite:///<storage_dir>/journal.sqlite
    max_associations: int = Field(16, ge=1)
    max_pdu: int = Field(262144, ge=0)  # 0 = unlimited (PS3.8 D.1 Maximum Length Sub-Item)
    min_free_disk_mb: int = Field(1024, ge=0)
    acse_timeout_s: float = Field(30, gt=0)
    dimse_timeout_s: float = Field(60, gt=0)
    network_timeout_s: float = Field(60, gt=0)
    tls: NodeTlsConfig | None = None
    sop_classes: SopClassFilter = SopClassFilter()

    @field_validator("storage_dir")
    @classmethod
    def _anchor_storage_dir(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)

    @model_validator(mode="after")
    def _default_journal(self) -> NodeConfig:
        if self.tls is not None and self.tls.port == self.port:
            raise ValueError(f"tls.port {self.tls.port} is the plain DICOM port too; give TLS its own (2762)")
        if self.journal_url is None:
            self.journal_url = f"sqlite:///{self.storage_dir / 'journal.sqlite'}"
        return self


class HttpTlsConfig(_TlsFiles):
    """HTTPS for the status API, so the bearer token and the journal's study identifiers are encrypted on
    the wire. `ca_certificates` is what `dicom-node status` trusts for it (default: `certificate`
    itself, which suits a self-signed one)."""

    certificate: Path
    private_key: Path
    ca_certificates: Path | None = None

    def contexts(self) -> list[ssl.SSLContext]:
        return [tls.server_context(self.certificate, self.private_key, None, False), self.client_context()]

    def client_context(self) -> ssl.SSLContext:
        """What `dicom-node status` connects with: the chain is checked, the host name is not (the
        address is this machine's own view of the node)."""
        return tls.client_context(self.ca_certificates or self.certificate, None, None, check_hostname=False)


class StowSender(_Model):
    """A STOW-RS client: the bearer token it sends, and the name the node files its instances under (the
    calling AE of the journal, the audit, the metrics and routing conditions such as `calling_ae`), as the
    calling AE title names a DIMSE sender."""

    name: str = Field(min_length=1, max_length=16)
    token: str = Field(min_length=16)

    @field_validator("name")
    @classmethod
    def _an_ae_title(cls, name: str) -> str:
        if not name.strip() or any(c == "\\" or ord(c) < 0x20 for c in name):
            raise ValueError("a sender name is filed as a calling AE title (PS3.5 6.2 AE): up to 16 characters, "
                             "not only spaces, no backslash or control character")
        return name


class StowConfig(_Model):
    """STOW-RS receive (PS3.18 10.5) on the HTTP server: `POST /dicomweb/studies[/{study}]`. Without a
    sender the endpoints answer 403. A request over `max_request_mb` or with more than `max_instances`
    parts is refused whole with 413."""

    senders: list[StowSender] = []
    max_request_mb: float = Field(1024, gt=0)
    max_instances: int = Field(5000, ge=1)

    @model_validator(mode="after")
    def _tokens_apart(self) -> StowConfig:
        tokens = [sender.token for sender in self.senders]
        if len(set(tokens)) != len(tokens):
            raise ValueError("two senders share a token: each token must name one sender")
        return self


class InferApiConfig(_Model):
    """`POST /v1/infer/{pipeline_or_model}` (dicom_node.ops.infer_api): an upload over `max_upload_mb`
    (or a zip that unpacks to more than `max_unzipped_mb`) is refused with 413. At most `max_concurrent`
    requests hold a job worker at a time and `max_queued` more wait; beyond that the answer is 503 with
    Retry-After, so requests never crowd out the jobs of received series (they share the workers FIFO).
    A request whose upload takes longer than `timeout_s` ends with 408, one whose inference does with 504
    (its worker process is replaced)."""

    max_upload_mb: float = Field(1024, gt=0)
    max_unzipped_mb: float = Field(4096, gt=0)
    max_concurrent: int = Field(1, ge=1)
    max_queued: int = Field(4, ge=0)
    timeout_s: float = Field(600, gt=0)
    retry_after_s: int = Field(30, ge=1)


class ModelAdminConfig(_Model):
    """`PUT /admin/model/{name}` (dicom_node.ops.model_admin): an upload, or the unpacked size of a zipped
    model folder, over `max_model_mb` is refused with 413; one that has not arrived within `upload_timeout_s`
    with 408 (a client trickling its body would otherwise hold a spool file and a connection)."""

    max_model_mb: float = Field(2048, gt=0)
    upload_timeout_s: float = Field(600, gt=0)


class HttpConfig(_Model):
    """The status API (/healthz, /readyz, /metrics, /v1/...) and the admin console (`/`).

    Loopback by default; bound anywhere else it carries job and patient-study
    identifiers off the machine, so it then requires a bearer token. The Host
    header of every request must name one of `allowed_hosts` (on loopback also
    a loopback name), so a page under another DNS name cannot reach the API
    through DNS rebinding; off loopback with console users, `allowed_hosts`
    must be set (the names people type in their browser).
    """

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    bearer_token: str | None = Field(None, min_length=16)
    allowed_hosts: list[str] = []
    tls: HttpTlsConfig | None = None
    stow: StowConfig = StowConfig()
    infer: InferApiConfig = InferApiConfig()
    admin: ModelAdminConfig = ModelAdminConfig()
    console: ConsoleConfig = ConsoleConfig()

    @field_validator("allowed_hosts")
    @classmethod
    def _names_only(cls, names: list[str]) -> list[str]:
        """Names as the Host header carries them, without port or scheme (an IPv6 address bare or in [])."""
        bare = [name.strip().lower().removeprefix("[").removesuffix("]") for name in names]
        for name in bare:
            if not name or "/" in name or ":" in name and not _ipv6(name):
                raise ValueError(f"allowed_hosts: {name!r} is not a host name or address (no port or scheme)")
        return bare

    @model_validator(mode="after")
    def _token_off_loopback(self) -> HttpConfig:
        loopback = self.host in LOOPBACK_HOSTS
        if not loopback and self.bearer_token is None:
            raise ValueError(f"host {self.host} is not loopback: set bearer_token (16 characters or more)")
        if self.console.read_only_without_login and not loopback:
            raise ValueError(f"console.read_only_without_login needs a loopback host, not {self.host}: off loopback "
                             "every page needs a login")
        if self.console.users and not loopback and not self.allowed_hosts:
            raise ValueError(f"host {self.host} is not loopback and console users are set: list the names the "
                             "console is reached by in allowed_hosts")
        if self.bearer_token is not None and any(s.token == self.bearer_token for s in self.stow.senders):
            raise ValueError("a stow sender's token is the admin bearer_token: a sender could read the API")
        return self


def _ipv6(name: str) -> bool:
    try:
        return isinstance(ipaddress.ip_address(name), ipaddress.IPv6Address)
    except ValueError:
        return False


class CallingAE(_Model):
    ae_title: str = Field(min_length=1, max_length=16)
    host: str | None = None  # when set, the association must come from this address
    tls_subject: str | None = Field(None, min_length=1)  # when set, only over DICOM TLS with this certificate CN


class SecurityConfig(_Model):
    allow_any_calling_ae: bool = False
    calling_aes: list[CallingAE] = []


class CompletionConfig(_Model):
    stable_seconds: float = Field(30, gt=0)
    after_release_seconds: float = Field(1, ge=0)  # docs/reliability.md says why 1 s


class ClusterConfig(_Model):
    """Nodes sharing one PostgreSQL journal and one spool (dicom_node.store.cluster); unused on SQLite.

    A job or export a node claims is leased to it for `lease_seconds`, renewed every
    `heartbeat_seconds` while the node lives; a node that dies loses its leases when they run out and
    another node takes the work over. `reconcile_interval_s`: how often the reconciliation singleton
    looks for the half-written files and unjournaled instances of nodes that died."""

    lease_seconds: float = Field(30, gt=0)
    heartbeat_seconds: float = Field(5, gt=0)
    reconcile_interval_s: float = Field(300, gt=0)

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> ClusterConfig:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError(f"heartbeat_seconds ({self.heartbeat_seconds:g}) must be at most half of lease_seconds "
                             f"({self.lease_seconds:g}): one late heartbeat must not lose a live node its leases")
        return self


class RetentionConfig(_Model):
    """When the node deletes a series' files; its journal history stays. None keeps it forever."""

    keep_days: float | None = Field(7, ge=0)  # every job done and every result delivered, or matched nothing
    keep_failed_days: float | None = Field(30, ge=0)  # a failed job, a dead-lettered export, or quarantined
    free_disk_target_mb: float | None = Field(None, ge=0)  # below it, done series go early, oldest first
    sweep_interval_s: float = Field(600, gt=0)

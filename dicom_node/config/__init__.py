"""The node's configuration: one YAML file, validated by a typed schema.

Every model forbids unknown keys, because a misspelt key silently ignored is
a setting the admin believes is active and is not. `load_config` reports each
problem with the file, line and dotted key path it refers to
(`config.yaml:12 destinations.pacs.port: ...`), found by walking the YAML
node tree along the error's location. Relative paths resolve against the
config file's folder, so the node behaves the same from any working directory.

One module over 400 lines for a reason: it mirrors the config.yaml reference,
section by section, so a key is found here where it is in the file.
"""

from __future__ import annotations

import base64
import random
import re
import ssl
from abc import abstractmethod
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from urllib.parse import urlsplit

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, SecretStr, Tag, ValidationError, ValidationInfo,
                      field_validator, model_validator)

from dicom_node import sop_classes, tls

# SeriesSummary fields (dicom_node.pipeline.volume) plus the association's AE titles.
MATCH_KEYS = frozenset({
    "modality", "body_part_examined", "series_description", "image_type", "slice_thickness",
    "number_of_slices", "manufacturer", "contrast_agent", "orientation", "calling_ae", "called_ae",
})


LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class ConfigError(Exception):
    """The configuration is unusable; `errors` are located lines ready to print."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _resolve(path: Path, info: ValidationInfo) -> Path:
    """Anchor a relative path at the config file's folder (passed as validation context)."""
    base = (info.context or {}).get("base_dir")
    return path if path.is_absolute() or base is None else Path(base) / path


class _TlsFiles(_Model):
    """TLS settings: every path (certificate, key, CA file) is anchored at the config file's folder, and
    the contexts they make are built once at load, so a bad file is a located config error."""

    @field_validator("*")
    @classmethod
    def _anchor(cls, value: Any, info: ValidationInfo) -> Any:
        return _resolve(value, info) if isinstance(value, Path) else value

    @abstractmethod
    def contexts(self) -> list[ssl.SSLContext]:
        """The SSL contexts these settings are for (each subclass names its own)."""

    @model_validator(mode="after")
    def _usable(self) -> _TlsFiles:
        try:
            self.contexts()
        except (OSError, ssl.SSLError) as error:
            raise ValueError(f"TLS certificate, key or CA file unusable: {error}") from None
        return self


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


class HttpConfig(_Model):
    """The status API (/healthz, /readyz, /metrics, /v1/...).

    Loopback by default; bound anywhere else it carries job and patient-study
    identifiers off the machine, so it then requires a bearer token.
    """

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=1, le=65535)
    bearer_token: str | None = Field(None, min_length=16)
    tls: HttpTlsConfig | None = None
    stow: StowConfig = StowConfig()

    @model_validator(mode="after")
    def _token_off_loopback(self) -> HttpConfig:
        if self.host not in LOOPBACK_HOSTS and self.bearer_token is None:
            raise ValueError(f"host {self.host} is not loopback: set bearer_token (16 characters or more)")
        if self.bearer_token is not None and any(s.token == self.bearer_token for s in self.stow.senders):
            raise ValueError("a stow sender's token is the admin bearer_token: a sender could read the API")
        return self


class CallingAE(_Model):
    ae_title: str = Field(min_length=1, max_length=16)
    host: str | None = None  # when set, the association must come from this address
    tls_subject: str | None = Field(None, min_length=1)  # when set, only over DICOM TLS with this certificate CN


class SecurityConfig(_Model):
    allow_any_calling_ae: bool = False
    calling_aes: list[CallingAE] = []


class CompletionConfig(_Model):
    stable_seconds: float = Field(30, gt=0)
    after_release_seconds: float = Field(2, ge=0)


class RetentionConfig(_Model):
    """When the node deletes a series' files; its journal history stays. None keeps it forever."""

    keep_days: float | None = Field(7, ge=0)  # every job done and every result delivered, or matched nothing
    keep_failed_days: float | None = Field(30, ge=0)  # a failed job, a dead-lettered export, or quarantined
    free_disk_target_mb: float | None = Field(None, ge=0)  # below it, done series go early, oldest first
    sweep_interval_s: float = Field(600, gt=0)


class TritonConfig(_Model):
    url: str = "127.0.0.1:8001"
    protocol: Literal["grpc", "http"] = "grpc"
    timeout_s: float = Field(60, gt=0)
    retries: int = Field(3, ge=0)


class EmbeddedConfig(_Model):
    cpu_threads: int = Field(0, ge=0)  # 0 = ONNX Runtime default
    providers: list[str] = []  # empty = CUDA if present else CPU


class InferenceConfig(_Model):
    backend: Literal["embedded", "triton"] = "embedded"
    model_repository: Path = Path("models")
    triton: TritonConfig = TritonConfig()
    embedded: EmbeddedConfig = EmbeddedConfig()
    workers: int = Field(1, ge=1)

    @field_validator("model_repository")
    @classmethod
    def _anchor_model_repository(cls, value: Path, info: ValidationInfo) -> Path:
        return _resolve(value, info)

    def backend_settings(self):
        """The inference package's settings for the backend this config selects (its only way in)."""
        from inference.backends import BackendSettings
        return BackendSettings(
            kind=self.backend, url=self.triton.url, protocol=self.triton.protocol,
            timeout_s=self.triton.timeout_s, retries=self.triton.retries,
            cpu_threads=self.embedded.cpu_threads, providers=list(self.embedded.providers),
        )


class RegexCondition(_Model):
    regex: str

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as error:
            raise ValueError(f"invalid regular expression: {error}") from None
        return value


class RangeCondition(_Model):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _ordered(self) -> RangeCondition:
        if self.min is None and self.max is None:
            raise ValueError("a range needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min is greater than max")
        return self


class ContainsAllCondition(_Model):
    contains_all: list[str] = Field(min_length=1)


Scalar = str | int | float
CONDITION_FORMS = "a value, a list of values, {regex: ...}, {min: ..., max: ...} or {contains_all: [...]}"


def _condition_form(value: Any) -> str | None:
    """Which form of match condition a YAML value is, told by its shape.

    Choosing by shape (instead of trying every union member) gives one error
    about the form the admin wrote, not one per form they did not mean.
    """
    if isinstance(value, BaseModel):
        return {RegexCondition: "=regex", RangeCondition: "=range", ContainsAllCondition: "=contains_all"}[type(value)]
    if isinstance(value, dict):
        return "=regex" if "regex" in value else "=contains_all" if "contains_all" in value else "=range"
    if isinstance(value, list):
        return "=list"
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return "=scalar"
    return None


MatchCondition = Annotated[
    Annotated[Scalar, Tag("=scalar")] | Annotated[list[Scalar], Tag("=list")] | Annotated[RegexCondition, Tag("=regex")]
    | Annotated[RangeCondition, Tag("=range")] | Annotated[ContainsAllCondition, Tag("=contains_all")],
    Discriminator(_condition_form, custom_error_type="match_condition",
                  custom_error_message=f"a match condition is {CONDITION_FORMS}"),
]


BUILT_IN_TASKS = ("lung_classical", "lung_involvement")  # run in the node, no model (inference.parameters)


class StepConfig(_Model):
    name: str = Field(min_length=1)
    task: Literal["segmentation", "classification", "lung_classical", "lung_involvement"]
    model: str | None = None  # repository model name; required unless the task is built in
    input_mask: str | None = None  # an earlier step whose mask a classifier or lung_involvement reads
    options: dict[str, Any] = {}  # a built-in task's parameters (inference.parameters), validated here

    @model_validator(mode="after")
    def _model_named(self) -> StepConfig:
        if self.task not in BUILT_IN_TASKS and not self.model:
            raise ValueError(f"task {self.task} needs a model")
        if self.task in BUILT_IN_TASKS and self.model:
            raise ValueError(f"{self.task} is built in and takes no model")
        if self.task == "lung_involvement" and not self.input_mask:
            raise ValueError("lung_involvement needs input_mask: the lung_classical step whose lungs it measures")
        if self.options:
            if self.task not in BUILT_IN_TASKS:
                raise ValueError(f"options are for the built-in tasks ({', '.join(BUILT_IN_TASKS)}), "
                                 f"not {self.task}: a model's settings live in its pipeline.yaml")
            self.parameters()  # raises ValueError naming the wrong option
        return self

    def parameters(self):
        """The typed parameters of a built-in step (defaults where `options` says nothing)."""
        from inference.parameters import PARAMETERS
        return PARAMETERS[self.task].from_options(self.options)


class _RoutedConfig(_Model):
    """What pipelines and forward rules share: match rules (dicom_node.pipeline.route) and destinations."""

    enabled: bool = True
    match: dict[str, MatchCondition] = Field(min_length=1)
    destinations: list[str] = []

    @field_validator("match")
    @classmethod
    def _known_keys(cls, match: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(match) - MATCH_KEYS)
        if unknown:
            raise ValueError(f"unknown match key(s) {', '.join(unknown)}; known: {', '.join(sorted(MATCH_KEYS))}")
        return match


class PipelineConfig(_RoutedConfig):
    steps: list[StepConfig] = Field(min_length=1)
    outputs: list[Literal["seg", "sr", "overlay", "keyimage"]] = ["seg"]  # keyimage: lung involvement only

    @field_validator("steps")
    @classmethod
    def _chained(cls, steps: list[StepConfig]) -> list[StepConfig]:
        seen: dict[str, str] = {}  # step name -> task
        for step in steps:
            if step.name in seen:
                raise ValueError(f"step name {step.name!r} used twice")
            if step.input_mask is not None and step.input_mask not in seen:
                raise ValueError(f"step {step.name!r}: input_mask {step.input_mask!r} is not an earlier step")
            if step.task == "lung_involvement" and seen[step.input_mask] != "lung_classical":
                raise ValueError(f"step {step.name!r}: input_mask {step.input_mask!r} is not a lung_classical step")
            seen[step.name] = step.task
        return steps


class ForwardConfig(_RoutedConfig):
    """Plain auto-routing: every original instance of a matching series, as received, to the
    destinations (the node inline between scanner and PACS), with the results' retry and dead letter."""

    destinations: list[str] = Field(min_length=1)


class RetryPolicy(_Model):
    """When a destination's transient failure is tried again, and when it is given up: the one policy every
    destination kind's exports follow (dicom_node.dispatch.exports asks it; a kind only says transient or permanent).

    Exponential backoff with jitter, so that the exports a PACS outage left pending do not all come back at
    the same second when it returns; capped, so a long outage is still noticed within `max_delay_s`.
    """

    initial_delay_s: float = Field(5, gt=0)
    max_delay_s: float = Field(600, gt=0)
    multiplier: float = Field(2.0, ge=1)
    jitter: float = Field(0.2, ge=0, le=1)
    max_attempts: int = Field(50, ge=1)

    def is_exhausted(self, attempts: int) -> bool:
        """After `attempts` tries, none is left: the export is dead-lettered."""
        return attempts >= self.max_attempts

    def next_delay_s(self, attempts: int, rng: random.Random) -> float:
        """Seconds to wait after the `attempts`-th try failed: initial_delay_s after the first, times
        multiplier after each further one, +-jitter, never over max_delay_s."""
        base = min(self.initial_delay_s * self.multiplier ** max(attempts - 1, 0), self.max_delay_s)
        return min(base * (1 + self.jitter * (2 * rng.random() - 1)), self.max_delay_s)


class DestinationTlsConfig(_TlsFiles):
    """Associations to this destination over TLS (dicom_node.tls)."""

    ca_certificates: Path | None = None  # None: the system's trust store
    certificate: Path | None = None  # ours, for destinations that authenticate their callers
    private_key: Path | None = None
    check_hostname: bool = False

    @model_validator(mode="before")
    @classmethod
    def _certificate_with_key(cls, values: Any) -> Any:
        if isinstance(values, dict) and (values.get("certificate") is None) != (values.get("private_key") is None):
            raise ValueError("certificate and private_key go together")
        return values

    def contexts(self) -> list[ssl.SSLContext]:
        return [tls.client_context(self.ca_certificates, self.certificate, self.private_key, self.check_hostname)]


class DestinationConfig(_Model):
    """A DIMSE destination (`kind: dimse`, the default): C-STORE to an AE (dicom_node.dispatch.dimse)."""

    kind: Literal["dimse"] = "dimse"
    ae_title: str = Field(min_length=1, max_length=16)
    host: str
    port: int = Field(ge=1, le=65535)
    calling_ae_title: str | None = Field(None, min_length=1, max_length=16)
    timeout_s: float = Field(30, gt=0)
    max_pdu: int = Field(0, ge=0)
    transfer_syntaxes: list[str] = []  # UIDs; empty = explicit + implicit VR little endian
    retry: RetryPolicy = RetryPolicy()
    tls: DestinationTlsConfig | None = None


class BasicAuth(_Model):
    """HTTP basic authentication (RFC 7617). The password is a SecretStr: printed, it is `**********`."""

    type: Literal["basic"]
    username: str = Field(min_length=1)
    password: SecretStr

    @field_validator("username")
    @classmethod
    def _no_colon(cls, value: str) -> str:
        if ":" in value:
            raise ValueError("a basic-auth username cannot contain ':' (RFC 7617 2)")
        return value

    def header(self) -> str:
        pair = f"{self.username}:{self.password.get_secret_value()}".encode()
        return "Basic " + base64.b64encode(pair).decode("ascii")


class BearerAuth(_Model):
    """An OAuth 2.0 bearer token (RFC 6750), as the cloud archives take; a SecretStr, never printed."""

    type: Literal["bearer"]
    token: SecretStr

    @field_validator("token")
    @classmethod
    def _not_empty(cls, value: SecretStr) -> SecretStr:
        if not value.get_secret_value().strip():
            raise ValueError("the bearer token is empty")
        return value

    def header(self) -> str:
        return f"Bearer {self.token.get_secret_value()}"


def _auth_form(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        return f"={value.type}"
    return f"={value['type']}" if isinstance(value, dict) and value.get("type") in ("basic", "bearer") else None


DicomwebAuth = Annotated[
    Annotated[BasicAuth, Tag("=basic")] | Annotated[BearerAuth, Tag("=bearer")],
    Discriminator(_auth_form, custom_error_type="dicomweb_auth",
                  custom_error_message="auth is {type: basic, username: ..., password: ...} or "
                                       "{type: bearer, token: ...} (leave auth out for none)"),
]


class DicomwebTlsConfig(DestinationTlsConfig):
    """HTTPS to a DICOMweb destination: its certificate must chain to `ca_certificates` (default: the
    system's trust store) and, unlike a DICOM peer, name the URL's host; `certificate` and `private_key`
    are ours, for servers that authenticate clients by certificate (mutual TLS)."""

    check_hostname: bool = True


class DicomwebDestinationConfig(_Model):
    """A DICOMweb destination (`kind: dicomweb`): STOW-RS (PS3.18 10.5) to `url`, the service's base URL
    (studies are stored under {url}/studies/{StudyInstanceUID}), `batch_size` instances a request."""

    kind: Literal["dicomweb"]
    url: str
    auth: DicomwebAuth | None = None
    tls: DicomwebTlsConfig | None = None
    batch_size: int = Field(50, ge=1, le=10_000)
    timeout_s: float = Field(30, gt=0)
    retry: RetryPolicy = RetryPolicy()

    @property
    def calling_ae_title(self) -> None:
        """STOW-RS has no AE titles; the export loop asks every kind for one."""
        return None

    @field_validator("url")
    @classmethod
    def _base_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.username is not None or parts.password is not None:
            raise ValueError("credentials do not belong in the URL (they would be logged): use auth")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http:// or https:// URL")
        if parts.query or parts.fragment:
            raise ValueError("the base URL takes no query or fragment")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _secure(self) -> DicomwebDestinationConfig:
        parts = urlsplit(self.url)
        if self.tls is not None and parts.scheme != "https":
            raise ValueError("tls is set but the url is not https://")
        if self.auth is not None and parts.scheme == "http" and parts.hostname not in LOOPBACK_HOSTS:
            raise ValueError(f"{self.auth.type} auth over plain http to {parts.hostname} would send the "
                             "credentials in clear text: use an https:// url")
        return self


def _destination_kind(value: Any) -> str | None:
    """Which kind of destination a config entry is (by its `kind`, default dimse), so that errors are
    about the kind the admin meant, not about every kind."""
    if isinstance(value, BaseModel):
        kind = value.kind
    else:
        kind = value.get("kind", "dimse") if isinstance(value, dict) else None
    return f"={kind}" if kind in DESTINATION_KINDS else None


# The kinds registered in dicom_node.dispatch.registry.KINDS (a test keeps the two lists the same).
DESTINATION_KINDS = {"dimse": DestinationConfig, "dicomweb": DicomwebDestinationConfig}

AnyDestination = Annotated[
    Annotated[DestinationConfig, Tag("=dimse")] | Annotated[DicomwebDestinationConfig, Tag("=dicomweb")],
    Discriminator(_destination_kind, custom_error_type="destination_kind",
                  custom_error_message=f"kind is one of {', '.join(DESTINATION_KINDS)} (default dimse)"),
]


class ResultsConfig(_Model):
    org_root: str | None = Field(None, pattern=r"^[0-9]+(\.[0-9]+)*$", max_length=40)
    manufacturer: str = "dicom-node"
    # Each output kind's SeriesNumber for the first pipeline's first generation; the others are derived
    # from them (dicom_node.results.series_number), so they must differ and lie within one decade.
    seg_series_number: int = Field(9901, ge=1, le=1_000_000)
    sr_series_number: int = Field(9902, ge=1, le=1_000_000)
    overlay_series_number: int = Field(9903, ge=1, le=1_000_000)
    keyimage_series_number: int = Field(9904, ge=1, le=1_000_000)
    series_description_prefix: str = "AI"
    seg_omit_empty_frames: bool = False
    empty_segmentation: Literal["write", "skip"] = "write"
    # Uncompressed by default: a 1-bit JPEG 2000 SEG is valid DICOM, but GDCM and dcmtk (and the
    # PACS and viewers built on them) cannot decode it, while a BINARY frame is only 32 KiB.
    compress_frames: bool = False

    @model_validator(mode="after")
    def _series_numbers_apart(self) -> ResultsConfig:
        numbers = (self.seg_series_number, self.sr_series_number, self.overlay_series_number,
                   self.keyimage_series_number)
        if len(set(numbers)) != len(numbers) or max(numbers) - min(numbers) >= 10:
            raise ValueError("the *_series_number settings must differ and lie within 10 of each other (each "
                             "pipeline adds 10, each generation 1000)")
        return self


class Config(_Model):
    node: NodeConfig = NodeConfig()
    http: HttpConfig = HttpConfig()
    security: SecurityConfig = SecurityConfig()
    completion: CompletionConfig = CompletionConfig()
    retention: RetentionConfig = RetentionConfig()
    inference: InferenceConfig = InferenceConfig()
    pipelines: dict[str, PipelineConfig] = {}
    forward: dict[str, ForwardConfig] = {}
    destinations: dict[str, AnyDestination] = {}
    results: ResultsConfig = ResultsConfig()
    source_path: Path | None = Field(None, exclude=True)  # the file it was loaded from

    @model_validator(mode="after")
    def _references(self, info: ValidationInfo) -> Config:
        if (info.context or {}).get("defer_references"):
            return self  # load_config reports them with their lines
        problems = reference_problems(self)
        if problems:
            raise ValueError("; ".join(f"{_dotted(loc)}: {message}" for loc, message in problems))
        return self


def reference_problems(config: Config) -> list[tuple[tuple[str | int, ...], str]]:
    """Names used in one section that another must define (pipeline and forward destinations), and forward
    rules named like a pipeline: a job is named by its pipeline or rule, one name per series generation."""
    return [
        ((section, name, "destinations", index), f"unknown destination {destination!r} (not under destinations)")
        for section, rules in (("pipelines", config.pipelines), ("forward", config.forward))
        for name, rule in rules.items()
        for index, destination in enumerate(rule.destinations)
        if destination not in config.destinations
    ] + [(("forward", name), f"a pipeline is named {name!r} too; jobs are named by their pipeline or forward "
                             "rule, so the names must differ") for name in config.forward if name in config.pipelines]


class UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing a key written twice in one mapping.

    YAML 1.2 says mapping keys are unique; PyYAML keeps the later value without a word, so a second
    `port:` under `node` (a merge gone wrong, a pasted block) would silently replace the first.
    Keys brought in by a merge (`<<: *anchor`) may be overridden, as YAML intends.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    earlier = first.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if earlier is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {earlier.line + 1}): "
                        "YAML keeps one value per key, remove one of them", key_node.start_mark)
        return super().construct_mapping(node, deep)


def load_config(path: str | Path) -> Config:
    """Read, validate and anchor a config file; raise ConfigError with located messages."""
    path = Path(path)
    label = path.name
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError([f"{path}: cannot read: {error.strerror or error}"]) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{label}:{mark.line + 1}" if mark is not None else label
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError([f"{where}: invalid YAML: {problem}"]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError([f"{label}:1: the top level must be a mapping of sections"])
    if "source_path" in data:
        raise ConfigError([f"{label}:{_line(root, ('source_path',))} source_path: Extra inputs are not permitted"])
    context = {"base_dir": path.resolve().parent, "defer_references": True}
    try:
        config = Config.model_validate(data, context=context)
    except ValidationError as error:
        raise ConfigError([
            f"{label}:{_line(root, item['loc'])} {_dotted(item['loc']) or '(top level)'}: {item['msg'].removeprefix('Value error, ')}"
            for item in error.errors(include_url=False)
        ]) from None
    problems = reference_problems(config)
    if problems:
        raise ConfigError([f"{label}:{_line(root, loc)} {_dotted(loc)}: {message}" for loc, message in problems])
    config.source_path = path.resolve()
    return config


def _dotted(loc: tuple[str | int, ...]) -> str:
    """The key path as the admin wrote it (match-condition form tags, `=...`, left out)."""
    return ".".join(str(part) for part in loc if not str(part).startswith("="))


def _line(root: yaml.Node | None, loc: tuple[str | int, ...]) -> int:
    """1-based line of the deepest YAML node reachable along a pydantic error location.

    Pydantic inserts union-member tags (e.g. `str`, `list[...]`) into the
    location; a part the node tree does not have is skipped, so the line is
    that of the nearest enclosing key that exists.
    """
    node = root
    line = node.start_mark.line if node is not None else 0
    for part in loc:
        child = _child(node, part)
        if child is None:
            continue
        key_line, node = child
        line = key_line
    return line + 1


def _child(node: yaml.Node | None, part: str | int) -> tuple[int, yaml.Node] | None:
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                return key.start_mark.line, value
    if isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        item = node.value[part]
        return item.start_mark.line, item
    return None

"""Prometheus metrics of one node, in a CollectorRegistry the node owns.

Events (an instance received, a series completed, a stage timed, a dispatch
failure) are counters and histograms the stages update as they happen. States
(jobs by pipeline and state, dead letters, series by state, disk free) are read
from the journal and the spool at scrape time by `JournalCollector`, so they are
right after a restart and after `dicom-node jobs retry` changed the journal
behind the node's back. A registry per node, not prometheus_client's global
one: two nodes in one process (the tests) never share counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from dicom_node.states import ExportState

PREFIX = "dicom_node"
TRANSPORTS = ("dimse", "stow")  # C-STORE, STOW-RS (the `transport` label of the received counters)
STAGES = ("wait_for_complete", "load", "inference", "encode", "dispatch")
# From tens of milliseconds (one C-STORE batch) to many minutes (a big volume on CPU).
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class NodeMetrics:
    """The node's event metrics; pass one instance to the receiver, tracker and pipeline."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.instances_received = Counter(f"{PREFIX}_instances_received", "Instances stored (C-STORE success, or "
                                          "referenced in a STOW-RS response), by transport: dimse or stow",
                                          ["calling_ae", "transport"], registry=r)
        self.bytes_received = Counter(f"{PREFIX}_received_bytes", "Bytes of instances stored, by transport",
                                      ["calling_ae", "transport"], registry=r)
        self.associations = Counter(f"{PREFIX}_associations", "Accepted associations that ended",
                                    ["calling_ae", "outcome"], registry=r)
        self.associations_open = Gauge(f"{PREFIX}_associations_open", "Associations open now", registry=r)
        self.associations_rejected = Counter(f"{PREFIX}_associations_rejected", "A-ASSOCIATE-RJ sent",
                                             ["reason"], registry=r)
        self.contexts_refused = Counter(f"{PREFIX}_presentation_contexts_refused",
                                        "Proposed presentation contexts refused, one per abstract syntax and "
                                        "association", ["calling_ae", "reason"], registry=r)
        self.conflicting_duplicates = Counter(f"{PREFIX}_conflicting_duplicates",
                                              "Other payloads under a stored SOP Instance UID, kept in the "
                                              "quarantine", ["calling_ae"], registry=r)
        self.series_completed = Counter(f"{PREFIX}_series_completed", "Series that became complete",
                                        ["trigger"], registry=r)
        self.stage_seconds = Histogram(f"{PREFIX}_stage_seconds", "Latency of each stage of a series",
                                       ["stage"], buckets=STAGE_BUCKETS, registry=r)
        self.dispatch_failures = Counter(f"{PREFIX}_dispatch_failures", "Instances a destination did not store",
                                         ["destination", "reason"], registry=r)
        self.exports_sent = Counter(f"{PREFIX}_exports_sent", "Instances a destination stored",
                                    ["destination"], registry=r)
        # One sample a configured destination, value 1: its transport ("dimse" C-STORE, "dicomweb" STOW-RS)
        # as a label to join the per-destination series with (`* on(destination) group_left(transport)`),
        # so each transport is counted apart without a second label on every counter.
        self.destination_info = Gauge(f"{PREFIX}_destination_info", "Configured destinations, by transport",
                                      ["destination", "transport"], registry=r)
        self.inference_requests = Counter(f"{PREFIX}_inference_requests", "Inference requests of jobs to each "
                                          "triton server, by outcome: ok, or failed (connection error or not "
                                          "ready: the request went to another server)",
                                          ["server", "outcome"], registry=r)
        self.series_purged = Counter(f"{PREFIX}_series_purged", "Series generations retention deleted from the spool",
                                     ["outcome"], registry=r)

    def describe_destinations(self, transports: Mapping[str, str]) -> None:
        """Publish each destination's transport (its config `kind`)."""
        for destination, transport in transports.items():
            self.destination_info.labels(destination=destination, transport=transport).set(1)

    def observe_stage(self, stage: str, seconds: float) -> None:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; one of {STAGES}")
        self.stage_seconds.labels(stage=stage).observe(max(seconds, 0.0))

    def received_by_transport(self) -> dict[str, dict[str, int]]:
        """Instances and bytes stored since the node started, by transport ("dimse", "stow"): /v1/status."""
        totals = {transport: {"instances": 0, "bytes": 0} for transport in TRANSPORTS}
        for counter, key in ((self.instances_received, "instances"), (self.bytes_received, "bytes")):
            for family in counter.collect():
                for sample in family.samples:
                    if sample.name.endswith("_total"):
                        totals.setdefault(sample.labels["transport"], {"instances": 0, "bytes": 0})[key] += \
                            int(sample.value)
        return totals

    def add_collector(self, collector: Collector) -> None:
        self.registry.register(collector)

    def exposition(self) -> bytes:
        """The Prometheus text format of everything registered."""
        return generate_latest(self.registry)


def failure_reason(kind: str, status: int | None) -> str:
    """A bounded label for a failed export: the kind and the instance's PS3.4 status (C-STORE, or a STOW-RS
    FailureReason); `association` when no answer was about the instance (an association or an HTTP request
    that failed as a whole)."""
    return f"{kind}:0x{status:04X}" if status is not None else f"{kind}:association"


class JournalCollector(Collector):
    """State gauges read at scrape time (see the module docstring)."""

    def __init__(self, counts: Callable[[], dict[str, dict[tuple[str, ...], int]]],
                 free_bytes: Callable[[], int], quarantined_files: Callable[[], int]) -> None:
        self._counts = counts
        self._free_bytes = free_bytes
        self._quarantined_files = quarantined_files

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self._counts()
        jobs = GaugeMetricFamily(f"{PREFIX}_jobs", "Jobs in the journal by pipeline and state",
                                 labels=["pipeline", "state"])
        for (pipeline, state), count in sorted(counts["jobs"].items()):
            jobs.add_metric([pipeline, state], count)
        yield jobs
        series = GaugeMetricFamily(f"{PREFIX}_series", "Series generations in the journal by state",
                                   labels=["state"])
        for (state,), count in sorted(counts["series"].items()):
            series.add_metric([state], count)
        yield series
        dead = GaugeMetricFamily(f"{PREFIX}_dead_letters", "Exports dead-lettered, by destination",
                                 labels=["destination"])
        for (destination, state), count in sorted(counts["exports"].items()):
            if state == ExportState.DEAD:
                dead.add_metric([destination], count)
        yield dead
        yield GaugeMetricFamily(f"{PREFIX}_disk_free_bytes", "Free bytes on the storage volume",
                                value=self._free_bytes())
        yield GaugeMetricFamily(f"{PREFIX}_quarantined_files",
                                "Files restart reconciliation could not journal, in <storage_dir>/quarantine",
                                value=self._quarantined_files())


class PipelineHealthCollector(Collector):
    """`dicom_node_pipeline_ready{pipeline}`: 1 ready, 0 degraded (dicom_node.pipeline.health), read at scrape time."""

    def __init__(self, health: Callable[[], list]) -> None:
        self._health = health

    def collect(self) -> Iterator[GaugeMetricFamily]:
        ready = GaugeMetricFamily(f"{PREFIX}_pipeline_ready",
                                  "1 when every model of the pipeline is available, 0 when it is degraded "
                                  "(its other steps still run)", labels=["pipeline"])
        for pipeline in self._health():
            ready.add_metric([pipeline.pipeline], 1 if pipeline.ready else 0)
        yield ready


class InferenceServerCollector(Collector):
    """`dicom_node_inference_server_up{server}`: 1 up, 0 down, each triton server probed at scrape time
    (dicom_node.pipeline.health.inference_servers); nothing with the embedded backend."""

    def __init__(self, servers: Callable[[], list]) -> None:
        self._servers = servers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(f"{PREFIX}_inference_server_up", "1 when the triton server answers ready, 0 when "
                               "it is down (no requests until a readiness probe succeeds)", labels=["server"])
        for server in self._servers():
            up.add_metric([server.url], 1 if server.up else 0)
        yield up

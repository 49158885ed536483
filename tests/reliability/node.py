"""The node under test and its PACS, for the reliability suite (the existing `Node` helper plus a pipeline)."""

from __future__ import annotations

from pathlib import Path

from dicom_node.store.journal import Journal
from tests.test_receive import Node

CT_PIPELINE = {
    "match": {"modality": "CT", "number_of_slices": {"min": 3}},
    "steps": [{"name": "lungs", "task": "lung_classical"}],
    "outputs": ["seg"], "destinations": ["pacs"],
}


def pacs_destination(port: int, ae_title: str = "STORESCP") -> dict:
    return {"pacs": {"ae_title": ae_title, "host": "127.0.0.1", "port": port,
                     "retry": {"initial_delay_s": 0.5, "max_delay_s": 2, "jitter": 0, "max_attempts": 50}}}


def node_with_pipeline(root: Path, pacs_port: int, *, pipeline: dict = CT_PIPELINE, pacs_ae: str = "STORESCP",
                       **overrides) -> Node:
    """A node whose CT series go to one pipeline and whose results go to the PACS on `pacs_port`."""
    sections = {"pipelines": {"ct": pipeline}, "destinations": pacs_destination(pacs_port, pacs_ae),
                "results": {"compress_frames": False}}  # storescp stores the uncompressed syntaxes only
    for section, values in overrides.items():
        sections[section] = {**sections.get(section, {}), **values}
    return Node(root, **sections)


def with_journal(node: Node, read):
    journal: Journal = node.journal()
    try:
        return read(journal)
    finally:
        journal.close()


def settled(node: Node, series_instance_uid: str):
    """The series once the node is done with it: quarantined, unmatched, or routed with every job finished."""
    def read(journal: Journal):
        record = journal.get_series(series_instance_uid)
        if record is None or record.state in ("receiving", "complete"):
            return None
        jobs = [j for j in journal.jobs_in_state("queued", "running", "done", "failed")
                if j.series_instance_uid == series_instance_uid and j.generation == record.generation]
        if record.state == "routed" and (not jobs or any(j.state in ("queued", "running") for j in jobs)):
            return None
        return record, jobs
    return with_journal(node, read)


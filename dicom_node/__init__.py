"""dicom-node: a DICOM node that brings AI results into the imaging workflow."""

__version__ = "0.1.0"  # the only place the version is written: pyproject.toml reads it from here


class ListenError(RuntimeError):
    """An address from config.yaml (DICOM port, TLS port, HTTP API) cannot be listened on: `serve` exits 1
    with this message instead of running without a front door or unobservable."""


class JournalSchemaError(RuntimeError):
    """The journal's tables cannot be used by this version as they are, nor upgraded in place (a column
    that must have a value is missing, or one this version does not know must have one): the command
    exits 1 with this message before it touches anything."""

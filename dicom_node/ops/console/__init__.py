"""The admin console: server-rendered pages at `/` for the people who run the node.

Overview, studies and series (searchable), a series page with its jobs,
exports, audit trail and result previews, failures to retry or discard,
models and the effective configuration. Pages are Jinja2 templates packaged
here (`templates/`), with a few lines of hand-written CSS and no script
beyond a page refresh; who may see and do what is `access`'s. The routes are
`views`'s, mounted on the API's app (`dicom_node.ops.api.create_app`) by `mount_console`, which
`dicom-node serve` calls.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

    from dicom_node.ops.api import NodeHandles


def mount_console(app: FastAPI, node: NodeHandles) -> None:
    """Add the console's routes to the API's `app`, sharing its access check's sessions (`app.state.access`)."""
    from dicom_node.ops.console.views import router

    app.include_router(router(node, app.state.access))

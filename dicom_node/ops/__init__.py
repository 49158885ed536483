"""Ops: what an admin and a monitor see: the HTTP API, the command line, status.

Nothing in the data flow imports this package; it starts the stages (serve) and reads
the journal.
"""

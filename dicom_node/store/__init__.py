"""Store: durable state every stage reads and writes.

The spool (files, safe paths), the journal (SQLite or PostgreSQL: series, instances,
jobs, exports), the audit trail and retention, which deletes what is settled.
"""

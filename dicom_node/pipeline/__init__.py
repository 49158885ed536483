"""Pipeline: from a complete series to result files.

In: series the journal holds. Completion decides when a series has arrived, routing
matches it to pipelines and forward rules, jobs run in worker processes (load the
volume, run each step, write result objects). Out: jobs and exports in the journal.
"""

"""Dispatch: result and forwarded instances to their destinations.

In: pending exports in the journal. Out: instances stored at the destination, or
retried under the destination's retry policy and dead-lettered when it gives up.
"""

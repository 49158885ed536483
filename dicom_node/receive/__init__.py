"""Receive: the DICOM upper layer and the Storage SCP.

In: associations and C-STOREs from senders. Out: instances durable in the spool and
journaled, and the completion tracker told which association sent what.
"""

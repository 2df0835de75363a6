"""Audit: append-only hash-chained decision log (``log.py``)."""

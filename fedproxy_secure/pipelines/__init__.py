"""Orchestration that drives both parties at once (the networked demo, the in-process simulation).

Neither the client nor the server imports this package; it imports both.
"""

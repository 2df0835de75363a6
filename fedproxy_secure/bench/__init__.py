"""Benchmarks called by the ``bench`` CLI commands (this regular package shadows opacus's top-level ``benchmarks``)."""

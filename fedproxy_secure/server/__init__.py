"""Networked federation server: durable store (``store``), round engine (``rounds``), HTTPS app (``app``)."""

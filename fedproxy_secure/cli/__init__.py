"""The ``fedproxy-secure`` command line (typer). Thin: parses, calls the SDK, prints."""

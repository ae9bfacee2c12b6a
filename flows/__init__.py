"""Prefect flows and the `reflow` command line."""

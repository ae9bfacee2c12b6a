"""Prefect tasks: one generic task that runs a DVC stage."""

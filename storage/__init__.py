"""Artifact I/O: zarr datasets, checkpoints, atomic files, scratch for resume, lineage and tracking."""

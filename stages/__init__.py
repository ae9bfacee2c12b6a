"""The pipeline's stages, one module each (`python -m stages.<name>`), and the runtime they share."""

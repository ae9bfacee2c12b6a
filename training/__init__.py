"""The training loop and where its batches come from (one loop for every model in the pipeline)."""

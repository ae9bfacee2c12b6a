"""Measuring generators: FID and its extractor, intervals, the velocity metrics, evaluation and the report."""

"""The stage runtime: the context a stage runs in, its main() and launcher, params, and the recipes stages share."""

"""Daemon mode: keep a list of images present on this node, serve the warmup API, open the start-up gate."""

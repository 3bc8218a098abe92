"""Annotators: turn images into condition maps (edges, ...)."""

"""The sweep layer: Ray Tune over the shared core (python -m viseg.sweep)."""

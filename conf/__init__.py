"""viseg's Hydra configs, shipped as package data (see viseg/resources.py). Values only: YAML."""

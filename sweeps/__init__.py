"""viseg's named sweep specs, shipped as package data (see viseg/resources.py). Values only: YAML."""

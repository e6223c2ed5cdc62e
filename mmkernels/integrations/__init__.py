"""Adapters for other libraries. Each submodule imports its library lazily: an optional dependency
that is missing only matters when its adapter is used."""

"""Integrations with other libraries. Each submodule imports its library lazily, so fastattn imports without it."""

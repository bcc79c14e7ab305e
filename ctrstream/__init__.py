"""ctrstream: shared pieces (configuration, feature declarations, CLI, local stack)."""

__version__ = "0.1.0"

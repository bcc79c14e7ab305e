"""The command line: one module per command group (see :mod:`ctrstream.cli.app`)."""

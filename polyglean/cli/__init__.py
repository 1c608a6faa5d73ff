"""The ``polyglean`` command line: one module per command."""

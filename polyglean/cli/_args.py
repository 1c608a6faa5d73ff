"""Kept so that branches written against it still merge; import from :mod:`polyglean.cli._common` instead."""

from polyglean.cli._common import add_model_arguments

__all__ = ["add_model_arguments"]

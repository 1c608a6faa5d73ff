"""Phase ensembles for deployment: a fixed set of states chosen on held-out data, run without any search."""

from polyglean.export.ensemble import PhaseEnsemble, State

__all__ = ["PhaseEnsemble", "State"]

"""Running whole models at chosen phases, exactly.

:class:`polyglean.phase.net.PhaseNet` runs a whole model (import it from ``polyglean``). One op at a phase (the
tensor function and the :class:`~polyglean.sites.ops.PhaseOp` that runs it inside a model) lives beside its op
kind in :mod:`polyglean.sites`; ``polyglean.phase.functional`` re-exports the functions. ``phase`` imports
``sites``, never the reverse.
"""

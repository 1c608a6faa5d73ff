"""Running subsampling ops and whole models at chosen phases, exactly.

``polyglean.phase.functional`` holds the pure tensor functions; :class:`polyglean.phase.net.PhaseNet` runs a
whole model (import it from ``polyglean``).
"""

"""Training on top of the search: fine-tuning with swapped layers and the learned aggregator.

Both sit above :mod:`polyglean.search` and :mod:`polyglean.aggregate` in the layering (they use them, never the
other way round):

- :mod:`polyglean.training.finetune`: a preset with its subsampling layers swapped, trained end to end.
- :mod:`polyglean.training.aggregator`: the learned aggregator trained on a frozen model's cached candidates.
"""

from polyglean.training import aggregator, finetune

__all__ = ["aggregator", "finetune"]

"""bloomray: BLOOM pretraining, fine-tuning, pruning search and serving on Ray."""

__version__ = "0.1.0"

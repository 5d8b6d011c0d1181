"""After training: consolidate a checkpoint into a model dir, its card and the sparse format.

``consolidate.py`` reads the checkpoint contract that ``train/checkpoint.py`` defines;
``load.py`` loads every kind of model dir bloomray writes; ``run.py`` is a training job as
``bloomray train`` runs it (train, summarise, export).
"""

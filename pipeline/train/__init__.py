"""Distributed CFM training on Ray Train.

- :mod:`pipeline.train.loop`: the worker loop (:func:`~pipeline.train.loop.training_loop`).
- :mod:`pipeline.train.trainer`: ``train(cfg) -> TrainResult`` (the TorchTrainer around it).
- :mod:`pipeline.train.data`: batch sources (the multi-epoch Ray Data stream, in-memory).
- :mod:`pipeline.train.ema`, :mod:`pipeline.train.validate`: EMA and the validation loss.

Submodules are imported on use: ``from pipeline.train.trainer import train``.
"""

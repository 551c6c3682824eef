"""Arc Institute's State transition model beside CCFM (optional extra ``[state]``).

* :mod:`ccfm.state.safe_load` — restricted unpickler for ``var_dims.pkl``, weights-only
  ``torch.load`` for tensors and checkpoints, ``yaml.safe_load`` for the config;
* :mod:`ccfm.state.model` — a State run directory loaded without executing anything from it,
  the basal encoder and ``predict_step`` as plain calls;
* :mod:`ccfm.state.train` — the pipeline method ``state``: training through arc-state's own
  ``state tx train`` entry point on a fold's training cells;
* :mod:`ccfm.state.predict` — fold predictions in the pipeline's prediction format;
* :mod:`ccfm.state.adapt` — a State run directory as the adapter's model (:class:`~ccfm.state.adapt.StateAdaptable`,
  the :mod:`ccfm.adapt.adaptable` interface): the MMD shift adapter's one path runs on it.

Only :mod:`ccfm.state.model` (when a model is built) imports arc-state; everything else works
without it.
"""

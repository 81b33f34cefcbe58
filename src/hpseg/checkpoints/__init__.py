"""Checkpoints: everything a trained model is read from and written to.

* :mod:`.payload`: the checkpoint schema, one typed owner (:class:`~.payload.CheckpointPayload`);
* :mod:`.store`: the file itself (atomic writes, weights-only reads, the format marker);
* :mod:`.sources`: the one resolver of what a user names (a checkpoint file, a run folder, a hub
  folder, an ``hf://`` name), with :mod:`.runs` (a run folder's chosen checkpoint),
  :mod:`.hub_folder` (the hub folder format and its validating reader) and :mod:`.hf_names`
  (``hf://`` names, checked before any lookup);
* :mod:`.authors`: the authors' checkpoints, converted in memory or imported;
* :mod:`.trained`: the one loader of trained models (``load_trained``);
* :mod:`.mapping`: where evaluations of a checkpoint and their cluster -> class mappings live;
* :mod:`.released`: the authors' released models by name (registry, verified download through
  :mod:`.download`), one more kind of source for :mod:`.sources`.
"""

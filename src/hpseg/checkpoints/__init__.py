"""Checkpoints: hpseg's own file format (:mod:`.store`), the import of the authors' reference
checkpoints (:mod:`.reference`), the one loader of trained models (:mod:`.trained`,
``load_trained``), where evaluations of a checkpoint and their mappings live (:mod:`.mapping`)
and the authors' released models by name (:mod:`.released`, downloaded by :mod:`.download`).
"""

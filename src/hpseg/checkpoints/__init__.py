"""Checkpoints: hpseg's own file format (:mod:`.store`) and the import of the authors'
reference checkpoints (:mod:`.reference`).
"""

"""Inference: from a trained model to label maps of any image.

Modules: :mod:`.tiling` (resize / pad / window geometry, one implementation), :mod:`.label_maps`
(probe scores to label maps, shared with evaluation), :mod:`.crf` (the optional dense CRF),
:mod:`.segmenter` (:class:`Segmenter`, ``hpseg.load``).
"""

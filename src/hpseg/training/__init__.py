"""Training: the trainer loop (:mod:`.trainer`), one step (:mod:`.step`), the threshold pools
(:mod:`.pools`), the feature sources it draws each step's inputs from (:mod:`.features`: the live
backbone; :mod:`.cache`: the precomputed feature cache), the label-free criteria of
``train.selection=unsupervised`` (:mod:`.selection`) and several seeds of one configuration
(:mod:`.multi_seed`, ``hpseg train --seeds``).
"""

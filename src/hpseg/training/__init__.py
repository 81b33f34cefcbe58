"""Training: the trainer loop (:mod:`.trainer`), the feature sources it draws each step's inputs
from (:mod:`.features`: the live backbone; :mod:`.cache`: the precomputed feature cache).
"""

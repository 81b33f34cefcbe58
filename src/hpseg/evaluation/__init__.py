"""Evaluation with the paper's protocol: metrics and Hungarian matching (:mod:`.metrics`),
cosine k-means (:mod:`.kmeans`), the evaluation loop, the DINO baseline and the results
writer (:mod:`.protocol`).
"""

"""Evaluation of trained models: training, held-out and reference ELBOs (:mod:`.elbo`), the
importance-sampled log-likelihood (:mod:`.likelihood`), the NUTS reference (:mod:`.reference`), bars and
field metrics (:mod:`.metrics`) and probabilistic PCA in closed form (:mod:`.ppca`).
"""

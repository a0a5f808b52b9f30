"""Inference at a given model: the closed-form objectives (:mod:`.objectives`, pure), the expected
sufficient statistics they read and the running table of minibatch training (:mod:`.statistics`),
the per-point solver (:mod:`.solver`) and annealing schedules (:mod:`.annealing`).
Imports models, guides, priors and closed forms; never the training loop.
"""

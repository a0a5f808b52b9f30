"""Posteriors and guides: the Gaussian-summary protocol every objective reads (:mod:`.posterior`), row
access to per-point parameters (:mod:`.rows`), the package's guides (:mod:`.guides`: per-point and
amortised, and the one covariance-family switch), the guides by name (:mod:`.registry`) and
semi-amortised refinement (:mod:`.semi_amortized`).
Imports only the closed forms and the priors below it.
"""

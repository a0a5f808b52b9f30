"""Closed forms: Gaussian entropies, E|z|, expected reconstruction errors (:mod:`.gaussian`), and the
closed-form KL divergences to the Laplace prior registered with torch (:mod:`.kl`), and the codes' Laplace
distribution (:mod:`.laplace`). The bottom layer:
nothing else recomputes these quantities.
"""

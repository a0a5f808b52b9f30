"""Results independent of the data's units: data times c gives the ELBO minus D log c, the same dictionary,
lambda and sigma scaled by c, codes scaled by c.

The model is scale-equivariant (z -> c z, lambda -> c lambda, sigma -> c sigma), and so are the EM route, the
scikit-learn estimator's default and ``denoise``: their steps are exact maximisations and their initial
values are relative to the data. Before the EM route the estimator on unscaled digits (0-16) reported
``converged_=True`` with codes of 7e-5. (fit's full-data default, L-BFGS, still depends on the units: issue 27.)
"""

import math
import warnings

import numpy as np
import pytest
import torch

import pyro
from pyro.infer.autoguide import AutoNormal

from pyro_esc import LocalMultivariateNormal, SparseCoding, fit
from pyro_esc.data import bars
from pyro_esc.denoising import denoise
from pyro_esc.sklearn import SparseCodingEstimator

SCALES = [1e-3, 16.0, 255.0, 1e3]


def em_fit(x, make_guide, batch_size=None):
    with pyro.get_param_store().scope():
        model = SparseCoding(x.size(1), 8).double()
        history = fit(model, make_guide(model), x, optimizer="em", steps=25, tol=None, batch_size=batch_size, seed=0,
                      progress=False)
        return history.final_elbo, model.dictionary.detach(), model.prior_scale.detach(), model.noise_var.detach()


@pytest.mark.parametrize("make_guide, batch_size", [
    (LocalMultivariateNormal, None),
    (lambda model: AutoNormal(model, create_plates=model.create_plates), 50),
])
def test_the_em_route_is_equivariant_to_the_data_units(make_guide, batch_size):
    x, _ = bars(150, side=4, noise=0.1, seed=0, dtype=torch.float64)
    elbo, dictionary, prior_scale, noise_var = em_fit(x, make_guide, batch_size)
    for c in SCALES:
        scaled = em_fit(x * c, make_guide, batch_size)
        # Equal up to the E-step's tolerance: where each point's Newton iterations stop depends on rounding, which
        # differs between units (even for c = 2), and the posteriors are then equal to about the square root of
        # the tolerance; 25 M-steps carry that along.
        assert scaled[0] + x.size(1) * math.log(c) == pytest.approx(elbo, abs=1e-4)
        torch.testing.assert_close(scaled[1], dictionary, rtol=0, atol=1e-3)
        torch.testing.assert_close(scaled[2] / c, prior_scale, rtol=1e-3, atol=0)
        torch.testing.assert_close(scaled[3] / c ** 2, noise_var, rtol=1e-3, atol=0)


def test_the_estimator_is_equivariant_to_the_data_units():
    from sklearn.datasets import load_digits

    x = load_digits().data[:100] / 16.0
    reference = SparseCodingEstimator(6, random_state=0).fit(x)
    reconstruction = reference.inverse_transform(reference.transform(x))
    for c in [16.0, 255.0, 1e-3]:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no ConvergenceWarning either
            scaled = SparseCodingEstimator(6, random_state=0).fit(x * c)
        assert scaled.converged_
        # Both stop on the same relative convergence test, at slightly different steps of a flat ridge: the
        # ELBO agrees to its tolerance, the reconstructions to a small fraction of the data's scale.
        assert scaled.elbo_ + x.shape[1] * math.log(c) == pytest.approx(reference.elbo_, abs=1e-4)
        assert scaled.score(x * c) + x.shape[1] * math.log(c) == pytest.approx(reference.score(x), abs=1e-4)
        difference = scaled.inverse_transform(scaled.transform(x * c)) / c - reconstruction
        assert np.abs(difference).max() < 1e-2 * np.abs(x).max()


def test_denoise_is_equivariant_to_the_image_units():
    from pyro_esc.data.images import cached_image

    image = cached_image("camera")[::8, ::8][:32, :32]
    noisy = image + 0.1 * np.random.default_rng(0).standard_normal(image.shape)
    reference = denoise(noisy, 5, max_patches=300)
    for c in [255.0, 1e-3]:
        result = denoise(noisy * c, 5, max_patches=300)
        np.testing.assert_allclose(result.image / c, reference.image, rtol=1e-7, atol=1e-9)
        assert result.noise_std / c == pytest.approx(reference.noise_std, rel=1e-7)

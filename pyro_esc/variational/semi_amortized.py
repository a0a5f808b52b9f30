"""Semi-amortised inference: encoder posteriors refined per point with the model fixed.

An encoder (:class:`~pyro_esc.AmortizedNormal`) maps x to q(z | x) in one pass, but it
cannot represent every point's optimum: the ELBO it reaches stays below the per-point
optimum at the same dictionary (the amortisation gap; ``benchmarks/amortisation_gap.py``).
:class:`SemiAmortized` uses the encoder's output as the starting point and refines each
point's posterior for K steps on the exact per-point ELBO, with W, lambda and sigma^2
held fixed (Kim et al. 2018, "Semi-amortized variational autoencoders"; Marino et al.
2018, "Iterative amortized inference").
"""

import torch

import pyro

from .._checks import check_data_cached, check_int, check_positive, check_subsample
from ..distributions.gaussian import expected_squared_errors, normal_log_normalizer
from ..priors import get_prior
from .guides import AmortizedNormal

__all__ = ["SemiAmortized", "point_elbos"]


def point_elbos(posterior, x, dictionary, prior_scale, noise_var, prior="laplace"):
    r"""The standard ELBO of every point at given W, lambda, sigma^2 (closed form), shape (B,).

    ::

        ELBO_n = H[q^(n)] - sum_h [log(2 lambda_h) + E|z_h| / lambda_h]
                 - D/2 log(2 pi sigma^2) - (||x^(n) - W nu^(n)||^2 + tr(W T^(n) W^T)) / (2 sigma^2)

    Their sum is ``-AnalyticELBO().loss`` at those parameters.

    :param ~pyro_esc.GaussianPosterior posterior: q for the B points (not joint).
    :param torch.Tensor x: the points, shape (B, D).
    :param torch.Tensor dictionary: W, shape (D, H).
    :param torch.Tensor prior_scale: lambda, shape (H,).
    :param torch.Tensor noise_var: sigma^2, a scalar.
    :param prior: the :class:`~pyro_esc.priors.Prior` (or its name) whose cross-entropy replaces the
        Laplace term above (default ``"laplace"``).
    """
    prior = get_prior(prior)
    statistic = prior.expected_statistic(posterior.mean, posterior.stddev)
    errors = expected_squared_errors(x, dictionary, posterior.mean, posterior.trace_terms(dictionary))
    return (posterior.point_entropies() - prior.cross_entropy(statistic, prior_scale)
            + normal_log_normalizer(noise_var, x.size(1)) - errors / (2 * noise_var))


class SemiAmortized:
    r"""A guide that refines an amortised encoder's posteriors for K steps, per point.

    For the points of a batch, q_0 = encoder(x) is the starting point; then K steps of
    Adam (learning rate ``lr``, decaying geometrically to ``final_lr``; or of L-BFGS, ``method``) ascend the
    per-point ELBO (:func:`point_elbos`) at the model's current W, lambda and sigma^2,
    all held fixed, in the encoder's own parameterisation (means; softplus^-1 of the
    scales; the Cholesky factor's strictly lower entries or the low-rank factor F).
    Adam acts elementwise and the ELBO is a sum over points, so with Adam a point's refined
    posterior q_K does not depend on which other points share its batch.

    **What trains what** (under :class:`~pyro_esc.EntropyELBO` or
    :class:`~pyro_esc.AnalyticELBO`, which read :meth:`gaussian_posterior`):

    - the objective's value is the ELBO of the refined posteriors q_K;
    - the dictionary (and, for AnalyticELBO, lambda and sigma^2) get the gradient of that
      ELBO with q_K held fixed: the refinement is not differentiated through (by the
      envelope theorem the missing term vanishes as q_K approaches the optimum);
    - the encoder is trained by **its own ELBO**, sum_n ELBO_n(q_0), at the fixed W, lambda,
      sigma^2: that term enters the returned summary with value 0 (added to the entropy as
      ``S - S.detach()``), so it contributes its gradient and nothing else. The encoder thus
      learns to be a good amortised guide on its own, and the refinement closes the rest of
      the gap. (Training the encoder by the refined ELBO's gradient instead would give it no
      signal once q_K has converged.)

    Because the returned gradient is not the gradient of the returned value, train with a
    first-order optimiser, not a line search: :func:`~pyro_esc.fit` takes the SVI route for
    this guide by default and refuses ``optimizer="lbfgs"``. Evaluation under
    ``torch.no_grad`` (:func:`~pyro_esc.held_out_elbo`, :func:`~pyro_esc.encode`) refines
    too and returns the refined posteriors. With ``steps=0`` the guide is the encoder.

    The ``lambda``, ``sigma^2`` the refinement uses are the model's current ones (after each
    step :func:`~pyro_esc.fit` writes Theorem 2's values into the model). Sampling objectives
    (``Trace_ELBO``) sample the refined posteriors but cannot train the encoder through them.

    Example::

        >>> import pyro, torch
        >>> from pyro_esc import AmortizedNormal, SemiAmortized, SparseCoding, gaussian_posterior
        >>> pyro.clear_param_store()
        >>> x = torch.randn(8, 4)
        >>> model = SparseCoding(4, 3)
        >>> model(x)                                     # the model initialises from the data it first sees
        tensor(...)
        >>> guide = SemiAmortized(AmortizedNormal(4, 3), model, steps=5)
        >>> tuple(gaussian_posterior(guide, x).mean.shape)   # the encoder's proposal after 5 steps per point
        (8, 3)

    :param ~pyro_esc.AmortizedNormal encoder: the amortised guide that proposes q_0 (its
        parameters are the ones trained; save it with :func:`~pyro_esc.save`).
    :param model: the :class:`~pyro_esc.SparseCoding` whose W, lambda, sigma^2 the refinement reads.
    :param int steps: refinement steps K (0: no refinement).
    :param float lr: Adam's learning rate for the refinement; default 0.05.
    :param float final_lr: learning rate at the last step (geometric decay); default ``lr``.
    :param str method: ``"adam"`` (default; K elementwise Adam steps, points independent) or
        ``"lbfgs"``: one L-BFGS run of at most K iterations on the batch's summed ELBO. It
        converges much faster and further, but its line search and curvature memory are
        shared by the batch, so a point's refined posterior depends (slightly, until
        converged) on the other points of its batch; ``lr`` and ``final_lr`` do not apply.
    """

    #: fit's route: the gradient is not the value's (see above), so no line search.
    lbfgs_compatible = False

    def __init__(self, encoder, model, steps=10, lr=0.05, final_lr=None, method="adam"):
        if not isinstance(encoder, AmortizedNormal):
            raise ValueError(f"encoder must be an AmortizedNormal, got {type(encoder).__name__}")
        self.encoder = encoder
        self.model = model
        self.steps = check_int(steps, "steps", minimum=0)
        self.lr = check_positive(lr, "lr")
        self.final_lr = self.lr if final_lr is None else check_positive(final_lr, "final_lr")
        if method not in ("adam", "lbfgs"):
            raise ValueError(f"method must be 'adam' or 'lbfgs', got {method!r}")
        self.method = method

    def __repr__(self):
        return (f"SemiAmortized(steps={self.steps}, method={self.method!r}, lr={self.lr:g}, "
                f"final_lr={self.final_lr:g}, {self.encoder!r})")

    @property
    def _pyro_name(self):
        return self.encoder._pyro_name

    def reset_parameters(self):
        """Redraw the encoder's initialisation (for :func:`~pyro_esc.fit`'s restarts)."""
        self.encoder.reset_parameters()

    # ---------------------------------------------------------------- parameterisation

    def _unconstrained(self, x_batch):
        """The encoder's q_0 as the tensors the refinement moves (with the encoder's graph): ``[loc,
        softplus^-1(scales - floor), extra]`` in the data's units (:meth:`~pyro_esc.AmortizedNormal.unconstrained`)."""
        return self.encoder.unconstrained(*self.encoder.encode(x_batch), floor=self._floor())

    def _constrained(self, params):
        """``(loc, scale)`` in the encoder's :meth:`~pyro_esc.AmortizedNormal.encode` format."""
        extra = params[2] if len(params) == 3 else None
        return self.encoder.encoding(params[0], params[1], extra, floor=self._floor())

    def _floor(self):
        # encode's scales are in the data's units: so is its floor.
        return self.encoder.min_scale * float(self.encoder.unit)

    def _summary(self, params):
        return self.encoder.posterior_from_encoding(*self._constrained(params))

    def _fixed_model(self, like):
        model = self.model
        with torch.no_grad():
            return (model.dictionary.detach().to(like), model.prior_scale.detach().to(like),
                    model.noise_var.detach().to(like), model.prior)

    # ---------------------------------------------------------------- refinement

    def refine(self, x_batch, initial, fixed=None):
        """K Adam steps on sum_n ELBO_n from ``initial`` (unconstrained tensors); returns them detached."""
        fixed = self._fixed_model(x_batch) if fixed is None else fixed
        params = [value.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)
                  for value in initial]
        if not self.steps:
            return [value.detach() for value in params]
        if self.method == "lbfgs":
            return self._refine_lbfgs(x_batch, params, fixed)
        optimizer = torch.optim.Adam(params, lr=self.lr)
        decay = (self.final_lr / self.lr) ** (1.0 / max(1, self.steps - 1))
        with torch.enable_grad():
            for step in range(self.steps):
                for group in optimizer.param_groups:
                    group["lr"] = self.lr * decay ** step
                loss = -point_elbos(self._summary(params), x_batch, *fixed).sum()
                grads = torch.autograd.grad(loss, params)
                for value, grad in zip(params, grads):
                    value.grad = grad
                optimizer.step()
        return [value.detach() for value in params]

    def _refine_lbfgs(self, x_batch, params, fixed):
        # One L-BFGS run of at most K iterations on the batch's summed ELBO (strong-Wolfe line search).
        optimizer = torch.optim.LBFGS(params, lr=1.0, max_iter=self.steps, history_size=20, tolerance_grad=1e-12,
                                      tolerance_change=1e-14, line_search_fn="strong_wolfe")

        def closure():
            loss = -point_elbos(self._summary(params), x_batch, *fixed).sum()
            grads = torch.autograd.grad(loss, params)
            for value, grad in zip(params, grads):
                value.grad = grad.contiguous()  # L-BFGS flattens the gradients with view
            return loss.detach()

        with torch.enable_grad():
            optimizer.step(closure)
        return [value.detach() for value in params]

    def encode(self, x):
        """The refined posteriors of the rows of x, in :meth:`~pyro_esc.AmortizedNormal.encode`'s format (no gradient).

        :param torch.Tensor x: data, shape (B, D).
        """
        x = check_data_cached(x, "x", self.encoder.data_dim)
        with torch.no_grad():
            return tuple(_detach(self._constrained(self.refine(x, self._unconstrained(x)))))

    def gaussian_posterior(self, x, subsample=None):
        """The protocol of :mod:`pyro_esc.posterior`: the refined q(z | x) for the points x[subsample].

        Carries, with value 0, the encoder's own ELBO for its gradient (see the class docstring).

        :param torch.Tensor x: all N data points, as passed to the model.
        :param torch.Tensor subsample: optional indices of the minibatch.
        :rtype: ~pyro_esc.GaussianPosterior
        """
        x = check_data_cached(x, "x", self.encoder.data_dim)
        subsample = check_subsample(subsample, x.size(0))
        x_batch = x if subsample is None else x.index_select(0, subsample)
        initial = self._unconstrained(x_batch)
        if not self.steps:
            return self._summary(initial)
        fixed = self._fixed_model(x_batch)
        posterior = self._summary(self.refine(x_batch, initial, fixed))
        if torch.is_grad_enabled() and any(value.requires_grad for value in initial):
            own = point_elbos(self._summary(initial), x_batch, *fixed)
            surrogate = own - own.detach()
            point_entropies = posterior.point_entropies
            posterior.point_entropies = lambda: point_entropies() + surrogate
            posterior.entropy = posterior.entropy + surrogate.sum()
        return posterior

    def posterior(self, x):
        """The refined posteriors of all rows of x as a :class:`~pyro_esc.GaussianPosterior`, without gradient."""
        with torch.no_grad():
            return self.gaussian_posterior(x).detach()

    def __call__(self, x, subsample=None, subsample_size=None):
        """Sample z from the refined posteriors inside the model's ``"data"`` plate (the model's arguments)."""
        x = check_data_cached(x, "x", self.encoder.data_dim)
        subsample = check_subsample(subsample, x.size(0))
        with pyro.plate("data", x.size(0), subsample=subsample, subsample_size=subsample_size, dim=-1) as index:
            batch = None if index.size(0) == x.size(0) else index
            posterior = self.gaussian_posterior(x, batch)
            return pyro.sample("z", posterior.per_point_distribution())


def _detach(values):
    for value in values:
        yield tuple(_detach(value)) if isinstance(value, tuple) else value.detach()

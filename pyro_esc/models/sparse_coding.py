"""The sparse coding model (a prior over latents, Gaussian noise) as a Pyro model (docs/theory.md, The model)."""

import warnings

import torch
from torch.distributions import constraints

import pyro
import pyro.distributions as dist
from pyro.nn import PyroModule, PyroParam, pyro_method

from .._checks import check_data_cached, check_int, check_positive_tensor, check_subsample
from .._pyro_internals import stored_unconstrained
from ..priors import get_prior

#: The attribute names of :class:`SparseCoding`'s Pyro params: W (unnormalised), lambda, sigma^2.
MODEL_PARAMETERS = ("raw_dictionary", "prior_scale", "noise_var")


class SparseCoding(PyroModule):
    r"""Probabilistic sparse coding with a Laplace prior (or another) and Gaussian noise.

    For data points x^(n) in R^D and latents z in R^H::

        p(z)   = prod_h Laplace(z_h; 0, lambda_h)          (prior="laplace", the default)
        p(x|z) = Normal(x; W z, sigma^2 I_D),   ||W_:h|| = 1 for every column h

    ``prior="gaussian"`` puts Normal(0, s_h^2) on the latents instead, which makes the model
    probabilistic PCA; any :class:`~pyro_esc.priors.Prior` plugs in the same way, and every
    objective, the solver, :func:`~pyro_esc.encode`, :func:`~pyro_esc.log_likelihood` and
    saving ask the model's ``prior`` (docs/guide/extending.md, "Adding a prior"). ``prior_scale`` is the
    prior's scale: lambda for Laplace, the standard deviation s for the Gaussian.

    The unit-length columns remove the scale ambiguity between W and lambda.
    Parameters are stored as Pyro params (``raw_dictionary``, whose columns are
    normalised on every read, ``prior_scale`` and ``noise_var``) so that any
    Pyro ELBO can learn them. With :class:`~pyro_esc.EntropyELBO` they are set
    to their closed-form optimum instead, by ``EntropyELBO.update`` (which
    :func:`~pyro_esc.fit` calls after every step).

    Calling ``model(x)`` runs the model: a plate ``"data"`` over the first
    dimension of x, a latent site ``"z"`` (event shape (H,)) and an observed
    site ``"x"`` (event shape (D,)). For minibatches pass the *full* data with
    ``subsample`` (indices) or ``subsample_size``, as in Pyro's subsampling
    idiom; the plate then scales the log density by N / B.

    **Initialisation from data.** Unless :meth:`set_dictionary` was called, the
    first call with data initialises the parameters from that data, in its
    dtype and on its device (Pyro's lazy-initialisation idiom): the dictionary
    columns are randomly chosen data points (normalised; a zero point is
    replaced by noise), sigma^2 is half the mean per-dimension data variance
    and lambda_h = sqrt(mean ||x||^2 / (2 H)), the scale at which H unit
    columns with Laplace amplitudes reproduce the data's energy (for another prior, the
    scale at which its latents have variance mean ||x||^2 / H). Randomness
    comes from torch's generator (``pyro.set_rng_seed``).

    :param int data_dim: D, the dimension of a data point.
    :param int n_latents: H, the number of latents (dictionary columns).
    :param str init: ``"data"`` (default, as above) or ``"random"`` (keep the
        random unit columns drawn at construction; only dtype and device follow
        the data).
    :param str name: prefix of the parameters' names in Pyro's param store
        (default none: ``raw_dictionary``, ``prior_scale``, ``noise_var``).
        Two models in one param store need different names, as for any
        PyroModule.
    :param prior: ``"laplace"`` (default), ``"gaussian"``, another registered name, or a
        :class:`~pyro_esc.priors.Prior`.

    Example::

        >>> from pyro_esc import SparseCoding
        >>> SparseCoding(data_dim=16, n_latents=8, prior="gaussian")
        SparseCoding(data_dim=16, n_latents=8, prior=Gaussian())
    """

    def __init__(self, data_dim, n_latents, init="data", name="", prior="laplace"):
        super().__init__(name=name)
        self.prior = get_prior(prior)
        self.data_dim = check_int(data_dim, "data_dim")
        self.n_latents = check_int(n_latents, "n_latents")
        if init not in ("data", "random"):
            raise ValueError(f"init must be 'data' or 'random', got {init!r}")
        self.init = init
        self.raw_dictionary = PyroParam(torch.randn(self.data_dim, self.n_latents))
        self.prior_scale = PyroParam(torch.ones(self.n_latents), constraints.positive)
        self.noise_var = PyroParam(torch.tensor(1.0), constraints.positive)
        # A buffer, so checkpoints (state_dict) remember that data has been seen.
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self):
        return f"data_dim={self.data_dim}, n_latents={self.n_latents}, prior={self.prior!r}"

    # ------------------------------------------------------------------ views

    @property
    def dictionary(self):
        """W, shape (D, H), with unit-length columns (a differentiable view of ``raw_dictionary``)."""
        raw = self.raw_dictionary
        return raw / raw.norm(dim=0)

    # ------------------------------------------------------------- the model

    def create_plates(self, x, subsample=None, subsample_size=None):
        """The ``"data"`` plate for ``model(x, ...)``.

        Pass it to an autoguide to share subsampling with the model, e.g.
        ``AutoNormal(model, create_plates=model.create_plates)``.
        """
        return pyro.plate("data", x.size(0), subsample=subsample, subsample_size=subsample_size, dim=-1)

    def forward(self, x=None, subsample=None, subsample_size=None):
        """Run the model on data ``x`` of shape (N, D), or draw from it with ``x=None``.

        :param torch.Tensor x: all N data points (also when subsampling); None draws
            ``subsample_size`` points (default 1) from the generative model, as Pyro's models do
            without data: z ~ p(z), then the site ``"x"`` sampled, x ~ p(x | z) (so
            ``pyro.infer.Predictive`` and ``poutine.trace`` see both). The model must have its
            dictionary and scales already (from training, from data, or set).
        :param torch.Tensor subsample: optional indices of the minibatch.
        :param int subsample_size: optional size of a random minibatch.
        :returns: the latent sample z, shape (B, H).
        """
        if x is None:
            return self._draw(subsample, subsample_size)
        # The plate draws a random subsample itself (not resolve_data), so that under
        # Trace_ELBO the model replays the guide's indices.
        x, subsample = self.resolve_data(x, subsample)
        dictionary = self.dictionary
        prior_scale = self.prior_scale
        noise_scale = self.noise_var.sqrt()
        with self.create_plates(x, subsample, subsample_size) as index:
            z = pyro.sample("z", self.prior.distribution(prior_scale).to_event(1))
            observed = x if index.size(0) == x.size(0) else x.index_select(0, index)
            pyro.sample("x", dist.Normal(z @ dictionary.T, noise_scale).to_event(1), obs=observed)
        return z

    def _draw(self, subsample, subsample_size):
        if subsample is not None:
            raise ValueError("subsample indexes data points; with x=None pass subsample_size, the number of points "
                             "to draw")
        num = 1 if subsample_size is None else check_int(subsample_size, "subsample_size")
        if not bool(self.initialized):
            raise ValueError("model(None) draws from the model, but this one has no dictionary yet: train it, run it "
                             "once on data (model(x)), or set_dictionary(...) first")
        dictionary, prior_scale, noise_scale = self.dictionary, self.prior_scale, self.noise_var.sqrt()
        with pyro.plate("data", num, dim=-1):
            z = pyro.sample("z", self.prior.distribution(prior_scale).to_event(1))
            pyro.sample("x", dist.Normal(z @ dictionary.T, noise_scale).to_event(1))
        return z

    def resolve_data(self, x, subsample=None, subsample_size=None):
        """Validate the model's arguments and initialise from data on first sight.

        Objectives that do not run the model (:class:`~pyro_esc.EntropyELBO`,
        :class:`~pyro_esc.AnalyticELBO`) call this with the model's arguments;
        a random ``subsample_size`` is drawn here into explicit indices.

        :returns: ``(x, subsample)`` with subsample a long tensor of indices or None.
        """
        x = check_data_cached(x, "x", self.data_dim)
        subsample = check_subsample(subsample, x.size(0))
        if subsample_size is not None:
            check_int(subsample_size, "subsample_size")
            if subsample is not None:
                raise ValueError("pass either subsample or subsample_size, not both")
            if subsample_size < x.size(0):
                subsample = torch.randperm(x.size(0), device=x.device)[:subsample_size]
        if not bool(self.initialized):
            self._initialize(x)
        else:
            # The unconstrained tensor carries dtype and device without a pyro.param call.
            param = self.raw_dictionary_unconstrained
            if param.dtype != x.dtype or param.device != x.device:
                raise ValueError(
                    f"x has dtype {x.dtype} on {x.device}, but the model was initialised with "
                    f"{param.dtype} on {param.device}; convert x or the model (model.to(...)).")
        return x, subsample

    @pyro_method
    @torch.no_grad()
    def _initialize(self, x):
        like = dict(dtype=x.dtype, device=x.device)
        n, dim = x.shape
        if bool((x == x[:1]).all()):
            warnings.warn("every data point is the same: the model explains constant data exactly, so sigma^2 "
                          "tends to 0 and the ELBO grows without bound during training", RuntimeWarning, stacklevel=4)
        if self.init == "data":
            # Columns start at data points: for sparse data, each is dominated by
            # few causes, which is a far better start than random directions.
            if n >= self.n_latents:
                index = torch.randperm(n, device=x.device)[: self.n_latents]
            else:
                index = torch.randint(n, (self.n_latents,), device=x.device)
            columns = x[index].T.clone()
            degenerate = columns.norm(dim=0) < 1e-12 * (1 + x.abs().max())
            columns[:, degenerate] = torch.randn(dim, int(degenerate.sum()), **like)
            columns = columns / columns.norm(dim=0)
            noise_var = 0.5 * x.var(0, unbiased=False).mean().clamp_min(1e-12)
            # The scale at which H unit columns reproduce the data's energy: latent variance mean ||x||^2 / H.
            prior_scale = self.prior.scale_for_variance(x.square().sum(1).mean() / self.n_latents).clamp_min(1e-6)
            self.raw_dictionary = PyroParam(columns)
            self.prior_scale = PyroParam(prior_scale.expand(self.n_latents).clone(), constraints.positive)
            self.noise_var = PyroParam(noise_var, constraints.positive)
        else:
            self.raw_dictionary = PyroParam(self.raw_dictionary.detach().to(**like))
            self.prior_scale = PyroParam(self.prior_scale.detach().to(**like), constraints.positive)
            self.noise_var = PyroParam(self.noise_var.detach().to(**like), constraints.positive)
        self.initialized.fill_(True)

    # ------------------------------------------------------------ setters

    @pyro_method
    @torch.no_grad()
    def set_scales(self, prior_scale=None, noise_var=None):
        """Set lambda (shape (H,) or a scalar) and/or sigma^2 (a scalar) in place.

        Values must be finite and positive. The parameters keep their identity,
        so optimiser state and the param store stay attached.
        """
        if prior_scale is not None:
            prior_scale = check_positive_tensor(prior_scale, "prior_scale", (self.n_latents,), self.prior_scale)
        if noise_var is not None:
            noise_var = check_positive_tensor(noise_var, "noise_var", (), self.noise_var)
        self.assign_scales(prior_scale, noise_var)

    @torch.no_grad()
    def assign_scales(self, prior_scale=None, noise_var=None):
        """Like :meth:`set_scales` without validation, for objectives that computed valid values.

        Runs on every training step, so it writes the unconstrained tensors
        directly instead of going through ``pyro.param``.
        """
        # The positive constraint's bijection is exp, so the unconstrained value is the log.
        if prior_scale is not None:
            torch.log(prior_scale, out=self._param_tensor("prior_scale"))
        if noise_var is not None:
            torch.log(noise_var, out=self._param_tensor("noise_var"))

    def _param_tensor(self, name):
        # The unconstrained tensor that the param store holds for this parameter (the one
        # the module adopts on its next read in its Pyro context), else the module's own.
        stored = stored_unconstrained(self, name)
        return getattr(self, name + "_unconstrained") if stored is None else stored

    @pyro_method
    @torch.no_grad()
    def set_dictionary(self, dictionary):
        """Set W (shape (D, H)); columns are normalised. Marks the model as initialised."""
        current = self.raw_dictionary
        dictionary = torch.as_tensor(dictionary)
        if tuple(dictionary.shape) != (self.data_dim, self.n_latents):
            raise ValueError(f"dictionary must have shape ({self.data_dim}, {self.n_latents}), "
                             f"got {tuple(dictionary.shape)}")
        norms = dictionary.norm(dim=0)
        if not bool(torch.isfinite(dictionary).all()) or not bool((norms > 0).all()):
            raise ValueError("dictionary must be finite with no zero column")
        current.unconstrained().copy_((dictionary / norms).to(current))
        self.initialized.fill_(True)

    # ------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, n):
        """Draw n samples (z, x) from the generative model; z is (n, H), x is (n, D)."""
        n = check_int(n, "n")
        z = self.prior.distribution(self.prior_scale.detach()).sample((n,))
        mean = z @ self.dictionary.detach().T
        x = mean + self.noise_var.detach().sqrt() * torch.randn_like(mean)
        return z, x

    @pyro_method
    def read_dictionary(self):
        """W read inside the model's Pyro context, so SVI registers and trains it.

        Objectives that compute with W without running the model must use this
        (or run the model), or SVI silently never updates the dictionary.
        """
        return self.dictionary

    @pyro_method
    def read_scales(self):
        """(lambda, sigma^2) read inside the model's Pyro context (see :meth:`read_dictionary`)."""
        return self.prior_scale, self.noise_var

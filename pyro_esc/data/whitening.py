"""PCA and ZCA whitening of data, with the maps back to pixel space."""

import numbers

import numpy as np
import torch

from .._checks import check_data, check_fields, check_int, check_positive


class Whitening:
    """Decorrelate data and scale every kept direction to unit variance: PCA or ZCA whitening.

    With the data mean m and covariance C = 1/N sum_n (x_n - m)(x_n - m)^T = U diag(l) U^T
    (eigenvalues l decreasing; U_k the first k eigenvectors as columns)::

        PCA:  y = diag(l_k + e)^(-1/2) U_k^T (x - m)       k numbers per data point
        ZCA:  y = U_k diag(l_k + e)^(-1/2) U_k^T (x - m)   D numbers per data point

    ZCA is the whitening closest to the identity map (its matrix is symmetric), so whitened
    patches still look like patches; PCA also reduces the dimension when k < D. With e = 0
    the whitened data of the fitted set have covariance I_k (PCA) or U_k U_k^T (ZCA; I_D
    when every component is kept).

    The inverse is x = m + A y with ``dewhitening_matrix`` A = U_k diag(l_k + e)^(1/2)
    (PCA) or U_k diag(l_k + e)^(1/2) U_k^T (ZCA); with k < D it is a pseudo-inverse that
    keeps the leading k directions. A model y = W z + noise learned on whitened data is in
    pixel space x = m + (A W) z + A noise, so A W are its generative fields in pixel space:
    :meth:`fields_to_pixels`. (For PCA with k < D the fields live in the reduced space and
    can only be displayed this way.)

    Directions whose variance is zero up to rounding - such as the constant patch after
    per-patch mean removal - are always dropped: whitening them would blow rounding noise up
    to unit variance.

    :param str method: "zca" (default) or "pca".
    :param n_components: the components kept: None keeps every direction with non-zero
        variance; an int k keeps the leading k; a float in (0, 1] keeps the fewest leading
        components that explain at least that fraction of the variance.
    :param float epsilon: regulariser added to every eigenvalue, e = epsilon * mean(l) (a
        fraction of the average per-dimension variance, so the result does not depend on the
        data's units). The default is only a numerical safeguard; values like 1e-2 damp the
        low-variance (for images: high-frequency, noise-dominated) directions.
    :param float tol: eigenvalues at most tol * max(l) count as zero variance; default
        max(machine epsilon of the data's dtype, D * float64 epsilon).
    """

    def __init__(self, method="zca", n_components=None, epsilon=1e-8, tol=None):
        if method not in ("zca", "pca"):
            raise ValueError(f"method must be 'zca' or 'pca', got {method!r}")
        if n_components is not None:
            if isinstance(n_components, bool) or not isinstance(n_components, numbers.Real):
                raise ValueError(f"n_components must be None, an int >= 1 or a float in (0, 1], "
                                 f"got {n_components!r}")
            if isinstance(n_components, numbers.Integral):
                n_components = check_int(n_components, "n_components")
            elif not 0 < n_components <= 1:
                raise ValueError(f"n_components as a float is a fraction of the variance and must be in "
                                 f"(0, 1], got {n_components!r}")
        if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not 0 <= epsilon < np.inf:
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        if tol is not None:
            tol = check_positive(tol, "tol")
        self.method = method
        self.n_components = n_components
        self.epsilon = float(epsilon)
        self.tol = tol
        self._state = None

    def __repr__(self):
        fitted = (f", fitted: {self.input_dim} -> {self.output_dim}, {self.n_kept} components"
                  if self.is_fitted else "")
        return (f"Whitening(method={self.method!r}, n_components={self.n_components!r}, "
                f"epsilon={self.epsilon!r}{fitted})")

    # -- fitting ---------------------------------------------------------------------------

    def fit(self, x):
        """Estimate the mean and covariance of ``x`` and build the whitening.

        :param x: data, shape (N, D) with N >= 2; a tensor or array.
        :returns: self.
        """
        x = check_data(x, "x", allow_numpy=True)
        if x.size(0) < 2:
            raise ValueError(f"x must hold at least 2 data points to estimate a covariance, got shape {tuple(x.shape)}")
        dim = x.size(1)
        # float64 throughout: small eigenvalues are what whitening divides by.
        data = x.detach().to(torch.float64)
        mean = data.mean(0)
        centred = data - mean
        covariance = centred.T @ centred / data.size(0)
        # The D x D decomposition runs in numpy: it is small, works for data on any device,
        # and torch.linalg.eigh was 100x slower with several CPU threads (torch 2.13).
        eigenvalues, eigenvectors = np.linalg.eigh(covariance.cpu().numpy())
        eigenvalues = torch.as_tensor(eigenvalues[::-1].copy(), device=data.device)
        eigenvectors = torch.as_tensor(eigenvectors[:, ::-1].copy(), device=data.device)
        # Fix eigenvector signs (largest entry positive) so PCA outputs are reproducible.
        biggest = eigenvectors.abs().argmax(0)
        signs = torch.sign(eigenvectors.gather(0, biggest[None])).squeeze(0)
        eigenvectors = eigenvectors * torch.where(signs == 0, torch.ones_like(signs), signs)
        largest = float(eigenvalues[0])
        if not largest > 0:
            raise ValueError("x has zero variance in every direction; there is nothing to whiten")
        tol = self.tol if self.tol is not None else max(torch.finfo(x.dtype).eps, dim * torch.finfo(torch.float64).eps)
        rank = int((eigenvalues > tol * largest).sum())
        kept = self._kept(eigenvalues[:rank], rank, dim)
        self._state = {
            "mean": mean,
            "components": eigenvectors[:, :kept].T.contiguous(),
            "variances": eigenvalues[:kept].clone(),
            "regulariser": self.epsilon * float(eigenvalues.clamp_min(0).mean()),
        }
        self._build()
        return self

    def _kept(self, variances, rank, dim):
        if self.n_components is None:
            return rank
        if isinstance(self.n_components, int):
            if self.n_components > dim:
                raise ValueError(f"n_components={self.n_components} exceeds the data dimension D = {dim}")
            if self.n_components > rank:
                raise ValueError(f"n_components={self.n_components}, but x has only {rank} directions with "
                                 f"non-zero variance (the rest are zero up to rounding)")
            return self.n_components
        explained = torch.cumsum(variances, 0) / variances.sum()
        # The fewest components reaching the fraction; the small slack absorbs rounding at 1.0.
        return min(int(torch.searchsorted(explained, torch.tensor(self.n_components - 1e-12,
                                                                  dtype=explained.dtype))) + 1, rank)

    def _build(self):
        state = self._state
        basis = state["components"].T  # (D, k)
        scales = (state["variances"] + state["regulariser"]).sqrt()
        if not bool((scales > 0).all()):
            raise ValueError("whitening needs positive variances in every kept direction")
        if self.method == "pca":
            self._matrix = (basis / scales).T
            self._inverse = basis * scales
        else:
            self._matrix = (basis / scales) @ basis.T
            self._inverse = (basis * scales) @ basis.T

    def fit_transform(self, x):
        """:meth:`fit` to ``x``, then return :meth:`transform` of it."""
        return self.fit(x).transform(x)

    # -- fitted state ----------------------------------------------------------------------

    @property
    def is_fitted(self):
        return self._state is not None

    def _fitted(self):
        if self._state is None:
            raise ValueError("this Whitening is not fitted yet: call fit(x) first")
        return self._state

    @property
    def mean(self):
        """The data mean m, shape (D,), float64."""
        return self._fitted()["mean"]

    @property
    def components(self):
        """The kept eigenvectors of the covariance as rows, shape (k, D), decreasing variance."""
        return self._fitted()["components"]

    @property
    def variances(self):
        """The kept eigenvalues l_k of the covariance, shape (k,), decreasing."""
        return self._fitted()["variances"]

    @property
    def n_kept(self):
        """The number k of kept components."""
        return self.components.size(0)

    @property
    def input_dim(self):
        """The data dimension D."""
        return self.components.size(1)

    @property
    def output_dim(self):
        """The dimension of whitened data: k for PCA, D for ZCA."""
        return self.n_kept if self.method == "pca" else self.input_dim

    @property
    def whitening_matrix(self):
        """M with y = M (x - m): shape (k, D) for PCA, (D, D) and symmetric for ZCA."""
        self._fitted()
        return self._matrix

    @property
    def dewhitening_matrix(self):
        """A with x = m + A y, shape (D, output_dim): maps whitened-space fields to pixel space."""
        self._fitted()
        return self._inverse

    # -- maps ------------------------------------------------------------------------------

    def transform(self, x):
        """Whiten data: y = M (x - m) for every row x.

        :param x: data of shape (N, D); tensor or array.
        :returns: tensor (N, output_dim) in the dtype and on the device of ``x``.
        """
        self._fitted()
        x = check_data(x, "x", data_dim=self.input_dim, allow_numpy=True)
        matrix = self._matrix.to(dtype=x.dtype, device=x.device)
        return (x - self.mean.to(dtype=x.dtype, device=x.device)) @ matrix.T

    def inverse_transform(self, y):
        """Map whitened data back: x = m + A y for every row y.

        :param y: whitened data of shape (N, output_dim); tensor or array.
        :returns: tensor (N, D) in the dtype and on the device of ``y``.
        """
        self._fitted()
        y = check_data(y, "y", data_dim=self.output_dim, allow_numpy=True)
        inverse = self._inverse.to(dtype=y.dtype, device=y.device)
        return y @ inverse.T + self.mean.to(dtype=y.dtype, device=y.device)

    def fields_to_pixels(self, fields):
        """Generative fields learned on whitened data, in pixel space: A W (no mean added).

        :param fields: dictionary W of shape (output_dim, H), one field per column.
        :returns: tensor (D, H) in the dtype and on the device of ``fields``.
        """
        self._fitted()
        fields = check_fields(fields, "fields")
        if fields.size(0) != self.output_dim:
            raise ValueError(f"fields must have shape (output_dim, H) = ({self.output_dim}, H) for this "
                             f"whitening, got {tuple(fields.shape)}")
        return self._inverse.to(dtype=fields.dtype, device=fields.device) @ fields

    # -- saving ----------------------------------------------------------------------------

    def state_dict(self):
        """Everything needed to rebuild this whitening (for torch.save / checkpoints)."""
        state = self._fitted()
        return {"method": self.method, "n_components": self.n_components, "epsilon": self.epsilon,
                "tol": self.tol, "mean": state["mean"], "components": state["components"],
                "variances": state["variances"], "regulariser": state["regulariser"]}

    @classmethod
    def from_state_dict(cls, state):
        """Rebuild a fitted whitening from :meth:`state_dict`'s output."""
        try:
            whitening = cls(state["method"], state["n_components"], state["epsilon"], state["tol"])
            whitening._state = {key: state[key] for key in ("mean", "components", "variances", "regulariser")}
        except (KeyError, TypeError) as error:
            raise ValueError(f"state must be a dict from Whitening.state_dict(), missing or bad: {error}") from error
        whitening._build()
        return whitening

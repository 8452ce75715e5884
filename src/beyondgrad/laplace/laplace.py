"""The Laplace approximation ``p(theta | D) ~ N(theta*, P^{-1})`` around a trained model.

Conventions (stated once; every method follows them):

* Likelihood from the loss: ``nn.MSELoss`` is a Gaussian ``N(y | f, sigma_noise^2 I)``
  (regression), ``nn.CrossEntropyLoss`` a categorical on the logits (class indices),
  ``nn.BCEWithLogitsLoss`` independent Bernoullis. The log-likelihood of the data is
  ``log p(D | theta) = -sum_n l_n`` for the classification losses and
  ``-sum_n ||y_n - f_n||^2 / (2 sigma^2) - (N K / 2) log(2 pi sigma^2)`` for MSE (``N K``
  output entries). ``loss_fn``'s own reduction does not matter: the curvature and the
  log-likelihood use the summed loss (reduction factor ``R = 1``; no ``1/N``).
* Posterior precision ``P = s H + P0`` over the flat vector of the selected parameters
  (``names``, in ``model.named_parameters()`` order, each flattened row-major; a weight
  ``[O, I]`` Kronecker block is ``B kron A`` as in :mod:`beyondgrad.factors`). ``H`` is the
  curvature (``fisher_type``: GGN ``"type-2"``, MC Fisher ``"mc"``, empirical Fisher
  ``"empirical"``) of the summed loss over ``data`` in the chosen ``structure``; ``s = 1``
  for classification and ``s = 1 / (2 sigma^2)`` for MSE (``s^2`` with the empirical Fisher),
  which turns the summed loss's curvature into that of the negative log-likelihood.
  ``P0 = diag(prior_precision)`` (a scalar, one value per parameter tensor, or one per entry).
* Log marginal likelihood (the usual Laplace evidence, ``theta0 = prior_mean``):
  ``log p(D | theta*) - 1/2 (log det P - log det P0 + (theta* - theta0)^T P0 (theta* - theta0))``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.utils._pytree import tree_map

from .. import linops
from ..distributed import group as dist_group
from .batches import read_batches
from .curvature import (
    Curvature,
    DenseCurvature,
    DiagonalCurvature,
    KroneckerCurvature,
    curvature_from_state,
)
from .last_layer import (
    CLOSED_FORM_FISHERS,
    FeatureRecorder,
    batch_curvature,
    kronecker_curvature,
    kronecker_sums,
    last_layer_jacobians,
    last_linear,
    output_hessian,
    select,
    structured_variance,
)
from .linops_adapter import (
    FISHER_TYPES,
    STRUCTURES,
    build_curvature,
    output_jacobians,
    sum_reduction,
)

PRED_TYPES = ("glm", "nn")
LINKS = ("probit", "mc")


def likelihood_of(loss_fn: nn.Module) -> str:
    """``"regression"`` (MSE), ``"classification"`` (CE), ``"binary"`` (BCE with logits);
    raises for losses that are no normalized likelihood (class weights, label smoothing).

    Args:
        loss_fn: the loss module (its reduction does not matter).

    Returns:
        The likelihood's name.

    Raises:
        ValueError: CE with ``weight``/``label_smoothing``, BCE with ``weight``/``pos_weight``.
        TypeError: any other loss.
    """
    if isinstance(loss_fn, nn.MSELoss):
        return "regression"
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        if loss_fn.weight is not None or loss_fn.label_smoothing != 0:
            raise ValueError("Laplace needs CrossEntropyLoss without weight/label_smoothing")
        return "classification"
    if isinstance(loss_fn, nn.BCEWithLogitsLoss):
        if loss_fn.weight is not None or loss_fn.pos_weight is not None:
            raise ValueError("Laplace needs BCEWithLogitsLoss without weight/pos_weight")
        return "binary"
    raise TypeError(
        f"unsupported loss {loss_fn!r}: use MSELoss, CrossEntropyLoss, BCEWithLogitsLoss"
    )


def select_parameters(model: nn.Module, subset: str | Sequence[str]) -> list[str]:
    """Names of the trainable parameters in ``subset``: ``"all"``, ``"last_layer"`` (the
    parameters of the last module that owns parameters) or a list of names (returned in
    ``model.named_parameters()`` order).

    Args:
        model: the model.
        subset: ``"all"``, ``"last_layer"`` or a sequence of parameter names.

    Returns:
        The selected names, in ``model.named_parameters()`` order.
    """
    named = [n for n, p in model.named_parameters() if p.requires_grad]
    if subset == "all":
        return named
    if subset == "last_layer":
        owners = [
            m
            for m, mod in model.named_modules()
            if any(p.requires_grad for p in mod.parameters(recurse=False))
        ]
        if not owners:
            raise ValueError("the model has no parameters")
        prefix = owners[-1] + "." if owners[-1] else ""
        chosen = [n for n in named if n.startswith(prefix) and "." not in n[len(prefix) :]]
        return chosen
    if isinstance(subset, str):
        raise ValueError(f"subset must be 'all', 'last_layer' or a list of names, got {subset!r}")
    unknown = sorted(set(subset) - set(named))
    if unknown:
        raise ValueError(f"unknown or frozen parameters: {unknown}")
    return [n for n in named if n in set(subset)]


def forward(model: nn.Module, X: Any, params: dict[str, Tensor] | None = None) -> Tensor:
    """``model(X)`` (tensor, tuple/list as positional, dict as keyword arguments), optionally
    with some parameters replaced (``torch.func.functional_call``)."""
    args, kwargs = (
        ((), X) if isinstance(X, dict) else (tuple(X) if isinstance(X, (tuple, list)) else (X,), {})
    )
    if params is None:
        return model(*args, **kwargs)
    return functional_call(model, params, args, kwargs)


def sample_rows(X: Any, start: int, stop: int) -> Any:
    """Samples ``start:stop`` of every tensor with a leading sample axis in ``X``."""
    N = leading_size(X)
    return tree_map(
        lambda t: t[start:stop] if isinstance(t, Tensor) and t.ndim and t.shape[0] == N else t, X
    )


def leading_size(X: Any) -> int:
    """The number of samples of ``X`` (the leading size of its first tensor)."""
    if isinstance(X, Tensor):
        return X.shape[0]
    values = X.values() if isinstance(X, dict) else X
    return leading_size(next(iter(values)))


class Laplace:
    """``bg.laplace.Laplace(model, loss_fn, data, structure="kfac", subset="all",
    prior_precision=1.0, sigma_noise=1.0, prior_mean=0.0, fisher_type="type-2",
    kfac_approx="expand", mc_samples=1, rank=10, generator=None)``.

    Args:
        model: the trained network (its current parameters are the MAP ``theta*``).
        loss_fn: ``nn.MSELoss``, ``nn.CrossEntropyLoss`` or ``nn.BCEWithLogitsLoss`` (any
            reduction; see the module docstring for the likelihood).
        data: iterable of ``(X, y)`` batches, or ``None`` to fit later (:meth:`fit`) or load
            (:meth:`load_state_dict`).
        structure: ``"full"``, ``"diag"``, ``"kfac"``, ``"ekfac"`` or ``"lowrank"``.
        subset: ``"all"``, ``"last_layer"`` or a list of parameter names.
        prior_precision: scalar, ``[n_tensors]`` (one per selected parameter tensor) or
            ``[P]`` (one per entry; not for the Kronecker structures).
        sigma_noise: observation noise std (regression only).
        prior_mean: ``theta0``, a scalar or ``[P]``.
        fisher_type: ``"type-2"`` (GGN), ``"mc"`` or ``"empirical"``.
        kfac_approx: ``"expand"``/``"reduce"`` for the Kronecker structures.
        mc_samples: labels per sample for ``fisher_type="mc"``.
        rank: number of eigenpairs for ``"lowrank"``.
        generator: for MC curvature and the Lanczos start vector.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module,
        data: Iterable[tuple[Any, Tensor]] | None = None,
        structure: str = "kfac",
        subset: str | Sequence[str] = "all",
        prior_precision: float | Tensor = 1.0,
        sigma_noise: float | Tensor = 1.0,
        prior_mean: float | Tensor = 0.0,
        fisher_type: str = "type-2",
        kfac_approx: str = "expand",
        mc_samples: int = 1,
        rank: int = 10,
        generator: torch.Generator | None = None,
    ):
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        if fisher_type not in FISHER_TYPES:
            raise ValueError(f"fisher_type must be one of {FISHER_TYPES}, got {fisher_type!r}")
        self.model, self.loss_fn = model, loss_fn
        self.likelihood = likelihood_of(loss_fn)
        self.structure, self.fisher_type = structure, fisher_type
        self.kfac_approx, self.mc_samples, self.rank = kfac_approx, mc_samples, rank
        self.generator = generator
        self.names = select_parameters(model, subset)
        named = dict(model.named_parameters())
        self.shapes = [named[n].shape for n in self.names]
        first = named[self.names[0]]
        self.dtype, self.device = first.dtype, first.device
        self.num_params = sum(s.numel() for s in self.shapes)
        self.curvature: Curvature | None = None
        self.mean = torch.cat([named[n].detach().reshape(-1) for n in self.names])
        self.prior_mean = torch.as_tensor(prior_mean, dtype=self.dtype, device=self.device)
        self.prior_precision = prior_precision  # type: ignore[assignment]
        self.sigma_noise = sigma_noise  # type: ignore[assignment]
        self.loss_sum = torch.zeros((), dtype=self.dtype, device=self.device)
        self.num_data, self.num_outputs = 0, 0
        if data is not None:
            self.fit(data)

    # -- hyperparameters -----------------------------------------------------------------------
    @property
    def prior_precision(self) -> Tensor:
        """Scalar, ``[n_tensors]`` or ``[P]``."""
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float | Tensor) -> None:
        t = torch.as_tensor(value, dtype=self.dtype, device=self.device).detach().clone()
        self._check_prior(t)
        self._prior_precision = t

    @property
    def sigma_noise(self) -> Tensor:
        """Observation noise standard deviation (regression; 1 for classification)."""
        return self._sigma_noise

    @sigma_noise.setter
    def sigma_noise(self, value: float | Tensor) -> None:
        t = torch.as_tensor(value, dtype=self.dtype, device=self.device).detach().clone()
        if t.ndim != 0 or float(t) <= 0:
            raise ValueError("sigma_noise must be a positive scalar")
        if self.likelihood != "regression" and float(t) != 1.0:
            raise ValueError("sigma_noise applies to regression (MSELoss) only")
        self._sigma_noise = t

    def _check_prior(self, t: Tensor) -> None:
        if t.ndim > 1 or (t.ndim == 1 and t.numel() not in (len(self.names), self.num_params)):
            raise ValueError(
                f"prior_precision must be a scalar, [{len(self.names)}] (per parameter tensor) "
                f"or [{self.num_params}] (per entry); got shape {tuple(t.shape)}"
            )
        if bool((t.detach() <= 0).any()):
            raise ValueError("prior_precision must be positive")

    def prior_vector(self, prior_precision: Tensor | None = None) -> Tensor:
        """The prior precision expanded to ``[P]`` (differentiable).

        Args:
            prior_precision: a scalar, ``[n_tensors]`` (one value per selected parameter
                tensor) or ``[P]`` (per entry); default: :attr:`prior_precision`.

        Returns:
            ``[P]``, one positive value per entry of the flat parameter vector.

        Raises:
            ValueError: a wrong shape or a non-positive value.
        """
        t = self.prior_precision if prior_precision is None else torch.as_tensor(prior_precision)
        self._check_prior(t)
        if t.ndim == 0:
            return t.expand(self.num_params)
        if t.numel() == self.num_params:
            return t
        sizes = torch.tensor([s.numel() for s in self.shapes], device=t.device)
        return torch.repeat_interleave(t, sizes)

    def _scale(self, sigma: Tensor) -> Tensor:
        if self.likelihood != "regression":
            return sigma.new_ones(())
        s = 1.0 / (2 * sigma**2)
        return s * s if self.fisher_type == "empirical" else s

    # -- fitting ---------------------------------------------------------------------------------
    def _fitted(self) -> Curvature:
        if self.curvature is None:
            raise RuntimeError("the Laplace approximation is not fitted: call fit(data)")
        return self.curvature

    def fit(self, data: Iterable[tuple[Any, Tensor]], process_group: Any = None) -> Laplace:
        """Compute the curvature over ``data`` and the log-likelihood at the current
        parameters (the MAP estimate).

        Args:
            data: iterable of ``(X, y)`` batches.
            process_group: ``None`` (under an initialized ``torch.distributed`` with several
                ranks, ``data`` is this rank's shard: curvature, loss and counts are summed
                over the ranks; see :mod:`beyondgrad.distributed`), a ``ProcessGroup``, or
                ``"local"`` (this rank's data is the whole data set).

        Returns:
            ``self``, fitted.
        """
        batches = read_batches(data)
        loss_sum = sum_reduction(self.loss_fn)
        group = dist_group.resolve_group(process_group)
        closed = self._closed_form_layer() if group is None else None
        curvature, totals = None, []
        if closed is None and self.structure == "kfac":  # its pass gives the loss too
            curvature = self._build(batches, loss_sum, process_group, totals)
            (total, n, n_out), sums = totals[0], None
        else:
            total, n, n_out, sums = self._forward_pass(batches, loss_sum, closed)
        # under torch.distributed each rank fits on its shard: sums over the ranks
        counts = torch.tensor([total, n, n_out], dtype=torch.float64, device=self.device)
        dist_group.all_reduce_sum_(counts, group)
        total, n, n_out = float(counts[0]), int(counts[1]), int(counts[2])
        self.loss_sum = torch.tensor(total, dtype=self.dtype, device=self.device)
        self.num_data, self.num_outputs = n, n_out
        named = dict(self.model.named_parameters())
        self.mean = torch.cat([named[k].detach().reshape(-1) for k in self.names])
        if sums is not None:  # last linear layer: closed form from the features
            curvature = self._closed_form_structure(sums, n)
        elif curvature is None:
            curvature = self._build(batches, loss_sum, process_group)
        self.curvature = curvature
        self._check_prior(self.prior_precision)
        return self

    def _build(
        self,
        batches: list[tuple[Any, Tensor]],
        loss_sum: nn.Module,
        process_group: Any,
        totals: list[tuple[float, int, int]] | None = None,
    ) -> Curvature:
        """The curvature from the engine and ``bg.linops`` (:func:`build_curvature`)."""
        return build_curvature(
            self.model,
            loss_sum,
            batches,
            self.names,
            self.structure,
            self.fisher_type,
            self.kfac_approx,
            self.mc_samples,
            self.rank,
            self.generator,
            process_group,
            totals,
        )

    def _closed_form_layer(self) -> tuple[nn.Linear, bool, bool] | None:
        """The last linear layer when the curvature has a closed form in its features
        (:mod:`beyondgrad.laplace.last_layer`): dense or diagonal structure, or KFAC over all
        of the layer's parameters; GGN or empirical Fisher; the selected parameters those of
        one ``nn.Linear``."""
        if self.fisher_type not in CLOSED_FORM_FISHERS:
            return None
        found = last_linear(self.model, self.names)
        if found is None or self.structure in ("full", "diag"):
            return found
        layer, has_weight, has_bias = found
        if self.structure == "kfac" and has_weight and has_bias == (layer.bias is not None):
            return found
        return None

    def _forward_pass(
        self,
        batches: list[tuple[Any, Tensor]],
        loss_sum: nn.Module,
        closed: tuple[nn.Linear, bool, bool] | None,
    ) -> tuple[float, int, int, list[Tensor] | None]:
        """One forward without a graph per batch: the summed loss, the sample and output
        counts and, for a closed-form last layer, the sums of :meth:`_closed_form_batch`
        (``None`` if any batch's model output is not the layer's own output, or the targets
        are no class indices)."""
        total, n, n_out = 0.0, 0, 0
        sums: list[Tensor] | None = None
        recorder = FeatureRecorder(closed[0]) if closed is not None else None
        with torch.no_grad(), recorder or contextlib.nullcontext():
            for X, y in batches:
                out = forward(self.model, X)
                total += float(loss_sum(out, y))
                n += out.shape[0]
                n_out += out.numel()
                if recorder is None:
                    continue
                phi = recorder.take(out)
                if phi is None or (self.likelihood == "classification" and y.ndim != 1):
                    recorder, sums = None, None  # no closed form: the engine serves it
                    continue
                parts = self._closed_form_batch(phi, out, y, closed)  # type: ignore[arg-type]
                sums = parts if sums is None else [a + b for a, b in zip(sums, parts)]
        return total, n, n_out, sums

    def _closed_form_batch(
        self, phi: Tensor, out: Tensor, y: Tensor, closed: tuple[nn.Linear, bool, bool]
    ) -> list[Tensor]:
        """One batch's ``[sum_n Lambda_n kron u_n u_n^T]`` over the selected entries (dense,
        or its diagonal), or for KFAC the factor sums ``[sum_n Lambda_n, sum_n u_n u_n^T]``."""
        form, lam = output_hessian(self.likelihood, self.fisher_type, out, y)
        if self.structure == "kfac":
            u = phi if closed[0].bias is None else torch.cat([phi, phi.new_ones(len(phi), 1)], 1)
            return list(kronecker_sums(form, lam, u))
        u = torch.cat([phi, phi.new_ones(phi.shape[0], 1)], 1)
        H = batch_curvature(form, lam, u, diagonal=self.structure == "diag")
        return [select(H, out.shape[1], phi.shape[1], closed[1], closed[2])]

    def _closed_form_structure(self, sums: list[Tensor], num_data: int) -> Curvature:
        """The structure from the summed closed-form parts (:meth:`_closed_form_batch`)."""
        if self.structure == "full":
            return DenseCurvature(self.names, self.shapes, sums[0])
        if self.structure == "diag":
            return DiagonalCurvature(self.names, self.shapes, sums[0])
        B, A = sums
        return kronecker_curvature(self.names, self.shapes, B, A / num_data, len(self.names) == 2)

    # -- evidence --------------------------------------------------------------------------------
    def log_likelihood(self, sigma_noise: Tensor | float | None = None) -> Tensor:
        """``log p(D | theta*)`` (differentiable in ``sigma_noise``)."""
        self._fitted()
        if self.likelihood != "regression":
            return -self.loss_sum
        sigma = self.sigma_noise if sigma_noise is None else torch.as_tensor(sigma_noise)
        norm = 0.5 * self.num_outputs * torch.log(2 * math.pi * sigma**2)
        return -self.loss_sum / (2 * sigma**2) - norm

    def log_marginal_likelihood(
        self,
        prior_precision: Tensor | float | None = None,
        sigma_noise: Tensor | float | None = None,
    ) -> Tensor:
        """The Laplace evidence (module docstring), a scalar differentiable in
        ``prior_precision`` and ``sigma_noise`` (defaults: the stored values)."""
        curv = self._fitted()
        sigma = self.sigma_noise if sigma_noise is None else torch.as_tensor(sigma_noise)
        prior = self.prior_vector(
            None if prior_precision is None else torch.as_tensor(prior_precision)
        )
        delta = self.mean - self.prior_mean
        logdet_post = curv.logdet(self._scale(sigma), prior)
        complexity = logdet_post - prior.log().sum() + (prior * delta * delta).sum()
        return self.log_likelihood(sigma) - 0.5 * complexity

    # -- posterior -------------------------------------------------------------------------------
    def posterior_solve(self, M: Tensor) -> Tensor:
        """``P^{-1} M`` for ``M`` ``[P]`` or ``[P, k]``."""
        curv = self._fitted()
        prior, scale = self.prior_vector(), self._scale(self.sigma_noise)
        out = curv.solve(scale, prior, M if M.ndim == 2 else M.unsqueeze(1))
        return out if M.ndim == 2 else out.squeeze(1)

    def posterior_covariance(self) -> Tensor:
        """``P^{-1}`` as a dense ``[P, P]`` matrix (small subsets only)."""
        eye = torch.eye(self.num_params, dtype=self.dtype, device=self.device)
        return self.posterior_solve(eye)

    def sample(self, n_samples: int, generator: torch.Generator | None = None) -> Tensor:
        """``[n_samples, P]`` draws from ``N(theta*, P^{-1})``.

        Args:
            n_samples: the number of draws.
            generator: the random generator of the standard normal draws (``None``: torch's
                global one); the draws are made on its device.

        Returns:
            ``[n_samples, P]``, flat parameter vectors (selected parameters, in
            ``model.named_parameters()`` order, each flattened row-major).
        """
        curv = self._fitted()
        device = generator.device if generator is not None else self.device
        Z = torch.randn(
            self.num_params, n_samples, generator=generator, dtype=self.dtype, device=device
        )
        Z = Z.to(self.device)
        prior, scale = self.prior_vector(), self._scale(self.sigma_noise)
        return (self.mean.unsqueeze(1) + curv.inverse_sqrt(scale, prior, Z)).T

    def functional_variance(self, X: Any, max_vectors: int | None = None) -> Tensor:
        """``J(x) P^{-1} J(x)^T`` per input, ``[N, K, K]`` (``K`` outputs per sample, the
        output flattened after the sample axis), on chunks of inputs with at most
        ``max_vectors`` outputs (``[P, chunk K]`` is held). Where the parameters are a last
        linear layer's, everything comes from one forward's features: the variance straight
        from a diagonal or Kronecker structure (``last_layer.structured_variance``), else the
        closed-form Jacobians (``last_layer.last_layer_jacobians``). Otherwise the per-sample
        Jacobians come from one engine backward per chunk (``linops_adapter.output_jacobians``;
        ``bg.linops.Jacobian`` where the model couples its samples); the quadratic form is
        ``W^T W`` with ``W = T^T J^T`` (:meth:`Curvature.whiten`: one triangular solve for
        the dense structure).

        Args:
            X: a batch of inputs (tensor, tuple or dict), ``N`` samples.
            max_vectors: the most outputs per chunk (at least one sample per chunk);
                default ``max(256, 2**22 // P)``.

        Returns:
            ``[N, K, K]``, the covariance of the linearized network's outputs (no
            observation noise).
        """
        curv = self._fitted()
        prior, scale = self.prior_vector(), self._scale(self.sigma_noise)
        N = leading_size(X)
        P = self.num_params
        if max_vectors is None:
            max_vectors = max(256, (1 << 22) // P)
        last = last_linear(self.model, self.names)
        if last is not None:  # closed-form Jacobians (None: the model's output is another)
            step = max(1, max_vectors // last[0].out_features)
            forms = []
            for start in range(0, N, step):
                var = self._last_layer_variance(sample_rows(X, start, min(N, start + step)), last)
                if var is None:
                    break
                forms.append(var)
            else:
                return torch.cat(forms)
        with torch.no_grad():
            out_shape = forward(self.model, sample_rows(X, 0, 1)).shape[1:]
        K = out_shape.numel()
        step = max(1, max_vectors // K)
        out = []
        for start in range(0, N, step):
            chunk = sample_rows(X, start, min(N, start + step))
            Jt = output_jacobians(self.model, chunk, self.names, out_shape)
            n = leading_size(chunk)
            if Jt is None:  # samples coupled: vector-Jacobian products per output
                dummy = torch.zeros(n, device=self.device)
                jac = linops.Jacobian(self.model, [(chunk, dummy)], params=self.names)
                Jt = jac.T @ torch.eye(n * K, dtype=self.dtype, device=self.device)
            out.append(self._quadratic_form(curv, scale, prior, Jt.reshape(P, n, K)))
        return torch.cat(out)

    @staticmethod
    def _quadratic_form(curv: Curvature, scale: Tensor, prior: Tensor, Jt: Tensor) -> Tensor:
        """``J P^{-1} J^T`` ``[n, K, K]`` from ``J^T`` ``[P, n, K]`` (``W^T W``, ``W`` the
        whitened ``J^T``)."""
        P, n, K = Jt.shape
        W = curv.whiten(scale, prior, Jt.reshape(P, n * K)).reshape(-1, n, K).permute(1, 2, 0)
        return W @ W.mT

    def _last_layer_variance(self, X: Any, last: tuple[nn.Linear, bool, bool]) -> Tensor | None:
        """``J P^{-1} J^T`` ``[N, K, K]`` from one forward without a graph when the selected
        parameters are those of a last linear layer whose output is the model's: from the
        structure (:func:`~beyondgrad.laplace.last_layer.structured_variance`: diagonal, one
        Kronecker block) or the closed-form Jacobians
        (:func:`~beyondgrad.laplace.last_layer.last_layer_jacobians`); else ``None``."""
        layer, has_weight, has_bias = last
        with torch.no_grad(), FeatureRecorder(layer) as recorder:
            out = forward(self.model, X)
            phi = recorder.take(out)
        if phi is None:
            return None
        curv, K = self._fitted(), out.shape[1]
        prior, scale = self.prior_vector(), self._scale(self.sigma_noise)
        var = structured_variance(curv, scale, prior, phi, K, has_weight, has_bias)
        if var is not None:
            return var
        Jt = last_layer_jacobians(phi, K, has_weight, has_bias)
        return self._quadratic_form(curv, scale, prior, Jt)

    # -- predictives -----------------------------------------------------------------------------
    def predictive(
        self,
        X: Any,
        pred_type: str = "glm",
        link_approx: str = "probit",
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """The posterior predictive at inputs ``X``.

        Args:
            X: a batch of inputs (tensor, tuple or dict), outputs ``[N, K]`` (or ``[N, *]``,
                flattened to ``K``).
            pred_type: ``"glm"`` (linearized network: ``f ~ N(f(x; theta*), J P^{-1} J^T)``)
                or ``"nn"`` (``n_samples`` parameter draws through the network).
            link_approx: for GLM classification: ``"probit"`` (``softmax(f / sqrt(1 + pi/8
                diag var))``, the same with a sigmoid for BCE) or ``"mc"`` (``n_samples``
                draws of ``f``).
            n_samples: Monte-Carlo draws (``"nn"`` and ``link_approx="mc"``).
            generator: for the draws.

        Returns:
            Classification: probabilities ``[N, C]`` (softmax; BCE: ``[N, K]`` probabilities
            of the positive class). Regression: ``(mean [N, K], covariance [N, K, K])`` of
            ``y``, the functional (or sample) covariance plus ``sigma_noise^2 I``.
        """
        if pred_type not in PRED_TYPES:
            raise ValueError(f"pred_type must be one of {PRED_TYPES}, got {pred_type!r}")
        if link_approx not in LINKS:
            raise ValueError(f"link_approx must be one of {LINKS}, got {link_approx!r}")
        if pred_type == "nn":
            return self._nn_predictive(X, n_samples, generator)
        with torch.no_grad():
            f = forward(self.model, X).detach()
        N = f.shape[0]
        if self.likelihood == "classification" and f.ndim != 2:
            raise ValueError(f"classification needs logits [N, C], got {tuple(f.shape)}")
        mean, var = f.reshape(N, -1), self.functional_variance(X)
        if self.likelihood == "regression":
            eye = torch.eye(var.shape[-1], dtype=var.dtype, device=var.device)
            return mean, var + self.sigma_noise**2 * eye
        if link_approx == "probit":
            kappa = (1 + math.pi / 8 * torch.diagonal(var, dim1=1, dim2=2)).rsqrt()
            return self._link(kappa * mean)
        e, V = torch.linalg.eigh(var)
        root = V * e.clamp_min(0).sqrt().unsqueeze(1)  # [N, K, K]
        device = generator.device if generator is not None else self.device
        eps = torch.randn(
            n_samples, *mean.shape, generator=generator, dtype=self.dtype, device=device
        )
        draws = mean + torch.einsum("nij,snj->sni", root, eps.to(self.device))
        return self._link(draws).mean(0)

    __call__ = predictive

    def _link(self, f: Tensor) -> Tensor:
        return torch.softmax(f, -1) if self.likelihood == "classification" else torch.sigmoid(f)

    def _nn_predictive(
        self, X: Any, n_samples: int, generator: torch.Generator | None
    ) -> Tensor | tuple[Tensor, Tensor]:
        thetas = self.sample(n_samples, generator)
        F = self._sampled_outputs(X, thetas)  # [S, N, K]
        if self.likelihood != "regression":
            return self._link(F).mean(0)
        mean = F.mean(0)
        centered = F - mean
        cov = torch.einsum("sni,snj->nij", centered, centered) / n_samples
        eye = torch.eye(cov.shape[-1], dtype=cov.dtype, device=cov.device)
        return mean, cov + self.sigma_noise**2 * eye

    def _sampled_outputs(self, X: Any, thetas: Tensor, chunk: int = 256) -> Tensor:
        """Model outputs ``[S, N, K]`` for parameter samples ``thetas [S, P]`` (vmapped over
        chunks of samples; a loop where the model has no vmap support)."""

        def run(theta: Tensor) -> Tensor:
            parts = torch.split(theta, [s.numel() for s in self.shapes])
            params = {n: t.view(s) for n, t, s in zip(self.names, parts, self.shapes)}
            f = forward(self.model, X, params)
            return f.reshape(f.shape[0], -1)

        with torch.no_grad():
            try:
                return torch.cat([torch.func.vmap(run)(t) for t in torch.split(thetas, chunk)])
            except RuntimeError:
                return torch.stack([run(theta) for theta in thetas])

    # -- hyperparameter optimization ---------------------------------------------------------------
    def optimize_prior_precision(
        self,
        method: str = "marglik",
        prior_structure: str | None = None,
        n_steps: int = 100,
        lr: float = 0.1,
        optimize_sigma_noise: bool = False,
        val_data: Iterable[tuple[Any, Tensor]] | None = None,
        grid: Sequence[float] | Tensor | None = None,
        pred_type: str = "glm",
        link_approx: str = "probit",
        n_samples: int = 100,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Tune the prior precision (and, by marginal likelihood, optionally ``sigma_noise``).

        Args:
            method: ``"marglik"`` (Adam on the log prior precision, maximizing
                :meth:`log_marginal_likelihood`) or ``"gridsearch"`` (the scalar from
                ``grid`` with the lowest negative log predictive density on ``val_data``).
            prior_structure: ``"scalar"``, ``"layerwise"`` (one value per parameter tensor;
                tied for a weight and its joint bias in the Kronecker structures) or
                ``"diagonal"`` (per entry; not for Kronecker structures); default: the shape
                of the current prior precision.
            n_steps, lr: Adam steps and learning rate (``"marglik"``).
            optimize_sigma_noise: also maximize over ``sigma_noise`` (regression).
            val_data: validation batches (``"gridsearch"``).
            grid: candidate values (default ``logspace(-4, 4, 21)``).
            pred_type, link_approx, n_samples, generator: the predictive for the validation NLL.

        Returns:
            The new prior precision (also stored).
        """
        if method == "marglik":
            return self._optimize_marglik(prior_structure, n_steps, lr, optimize_sigma_noise)
        if method != "gridsearch":
            raise ValueError(f"method must be 'marglik' or 'gridsearch', got {method!r}")
        if val_data is None:
            raise ValueError("gridsearch needs val_data")
        batches = read_batches(val_data)
        values = torch.logspace(-4, 4, 21, dtype=torch.float64)
        if grid is not None:
            values = torch.as_tensor(grid, dtype=torch.float64)
        scores = []
        for v in values:
            self.prior_precision = float(v)
            scores.append(
                self.validation_nll(batches, pred_type, link_approx, n_samples, generator)
            )
        self.prior_precision = float(values[int(torch.tensor(scores).argmin())])
        return self.prior_precision

    def _prior_layout(self, prior_structure: str | None) -> tuple[list[list[int]] | None, Tensor]:
        """The tied groups of parameter tensors (``None``: per entry) and their initial log
        prior precisions."""
        current = self.prior_vector().detach()
        if prior_structure is None:
            t = self.prior_precision
            numel = t.numel() if t.ndim else 0
            prior_structure = {0: "scalar", self.num_params: "diagonal"}.get(numel, "layerwise")
        if prior_structure == "scalar":
            return [list(range(len(self.names)))], current[:1].log()
        if prior_structure == "diagonal":
            if isinstance(self.curvature, KroneckerCurvature):
                raise ValueError("a per-entry prior does not keep the Kronecker structure")
            return None, current.log()
        if prior_structure != "layerwise":
            raise ValueError(f"unknown prior_structure {prior_structure!r}")
        groups = self._fitted().tied()
        starts = torch.cumsum(torch.tensor([0] + [s.numel() for s in self.shapes]), 0)
        return groups, torch.stack([current[int(starts[g[0]])] for g in groups]).log()

    def _expand(self, groups: list[list[int]] | None, log_values: Tensor) -> Tensor:
        if groups is None:
            return log_values.exp()
        if len(groups) == 1 and len(groups[0]) == len(self.names):
            return log_values[0].exp()
        per_tensor = [log_values.new_zeros(())] * len(self.names)
        for value, group in zip(log_values, groups):
            for i in group:
                per_tensor[i] = value
        return torch.stack(per_tensor).exp()

    def _optimize_marglik(
        self, prior_structure: str | None, n_steps: int, lr: float, optimize_sigma: bool
    ) -> Tensor:
        groups, log_prior = self._prior_layout(prior_structure)
        log_prior = log_prior.clone().requires_grad_(True)
        log_sigma = self.sigma_noise.log().clone().requires_grad_(optimize_sigma)
        params = [log_prior, log_sigma] if optimize_sigma else [log_prior]
        opt = torch.optim.Adam(params, lr=lr)
        for _ in range(n_steps):
            opt.zero_grad()
            prior = self._expand(groups, log_prior)
            loss = -self.log_marginal_likelihood(prior, log_sigma.exp())
            loss.backward()
            opt.step()
        self.prior_precision = self._expand(groups, log_prior.detach())
        if optimize_sigma:
            self.sigma_noise = log_sigma.detach().exp()
        return self.prior_precision

    def validation_nll(
        self,
        data: Iterable[tuple[Any, Tensor]],
        pred_type: str = "glm",
        link_approx: str = "probit",
        n_samples: int = 100,
        generator: torch.Generator | None = None,
        process_group: Any = None,
    ) -> float:
        """Mean negative log predictive density per sample over ``data``.

        Args:
            data: an iterable of ``(X, y)`` batches.
            pred_type: ``"glm"`` or ``"nn"``, as in :meth:`predictive`.
            link_approx: ``"probit"`` or ``"mc"``, as in :meth:`predictive`.
            n_samples: Monte-Carlo draws, as in :meth:`predictive`.
            generator: for the draws.
            process_group: ``None`` (under an initialized ``torch.distributed`` with several
                ranks, ``data`` is this rank's shard: the sum and the count are summed over
                the ranks, so every rank gets the same value and ``"gridsearch"`` picks the
                same prior), a ``ProcessGroup``, or ``"local"`` (this rank's data alone).

        Returns:
            The NLL summed over the samples, divided by their number (regression: the
            Gaussian density of ``y`` under the predictive mean and covariance).
        """
        total, count = 0.0, 0
        for X, y in data:
            pred = self.predictive(X, pred_type, link_approx, n_samples, generator)
            total += float(self._nll(pred, y).sum())
            count += y.shape[0]
        sums = torch.tensor([total, count], dtype=torch.float64, device=self.device)
        dist_group.all_reduce_sum_(sums, dist_group.resolve_group(process_group))
        return float(sums[0] / sums[1])

    def _nll(self, pred: Tensor | tuple[Tensor, Tensor], y: Tensor) -> Tensor:
        if self.likelihood == "regression":
            mean, cov = pred  # type: ignore[misc]
            r = (y.reshape(mean.shape) - mean).unsqueeze(-1)
            quad = (r.transpose(1, 2) @ torch.linalg.solve(cov, r)).reshape(-1)
            return 0.5 * (torch.logdet(2 * math.pi * cov) + quad)
        probs = pred.clamp_min(1e-12)  # type: ignore[union-attr]
        if self.likelihood == "classification":
            return -probs.gather(1, y.reshape(-1, 1)).log().reshape(-1)
        t = y.reshape(probs.shape)
        q = (1 - pred).clamp_min(1e-12)  # type: ignore[operator]
        return -(t * probs.log() + (1 - t) * q.log()).sum(1)

    # -- persistence -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything fitted (curvature, MAP, hyperparameters), as tensors and metadata."""
        return {
            "structure": self.structure,
            "fisher_type": self.fisher_type,
            "likelihood": self.likelihood,
            "names": list(self.names),
            "mean": self.mean,
            "prior_mean": self.prior_mean,
            "prior_precision": self.prior_precision,
            "sigma_noise": self.sigma_noise,
            "loss_sum": self.loss_sum,
            "num_data": self.num_data,
            "num_outputs": self.num_outputs,
            "curvature": None if self.curvature is None else self.curvature.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` into a ``Laplace`` built on the same model and loss
        (``data=None`` is enough).

        Args:
            state: what :meth:`state_dict` returned.

        Raises:
            ValueError: the state's structure, likelihood or parameter names differ.
        """
        for key in ("structure", "likelihood", "names"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"state has {key}={state[key]!r}, this object {getattr(self, key)!r}"
                )
        self.fisher_type = state["fisher_type"]
        self.mean, self.prior_mean = state["mean"], state["prior_mean"]
        self.loss_sum = state["loss_sum"]
        self.num_data, self.num_outputs = state["num_data"], state["num_outputs"]
        curv = state["curvature"]
        self.curvature = None if curv is None else curvature_from_state(curv)
        self.sigma_noise = state["sigma_noise"]
        self.prior_precision = state["prior_precision"]

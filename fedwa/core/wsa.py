"""Weight Scope Alignment (WSA): keep every client's per-layer weight distribution on a shared one.

WSA (Xu, Li, Gan, Zhan, "Weight Scope Alignment: A Frustratingly Easy Method for Model
Merging", arXiv 2408.12237) summarises each selected layer's weight tensor ``W_l`` by a Gaussian
``N(mu_l, sigma_l^2)``, its *weight scope*: ``mu_l`` is the mean and ``sigma_l`` the
(population) standard deviation of the entries of ``W_l``. Models whose layers share a scope merge
better, so every client adds a term to its loss that pulls its scopes towards target scopes
``(mu*_l, sigma*_l)`` sent by the server:

    loss = task_loss + lambda * sum_l KL( N(mu_l, sigma_l^2) || N(mu*_l, sigma*_l^2) ),

    KL(N(mu, s^2) || N(m, t^2)) = log(t / s) + (s^2 + (mu - m)^2) / (2 t^2) - 1/2.

After a round the server fuses the clients' scopes into the next targets. The paper does not
pin down the fusion rule for this setting (we could not confirm it from the text), so
:func:`fuse_scopes` uses moment matching: the target is the single Gaussian with the mean and
variance of the mixture ``sum_k p_k N(mu_k, sigma_k^2)`` of the client scopes.

Example
-------
>>> import torch
>>> s = scopes({"w": torch.tensor([[1.0, 2.0], [3.0, 4.0]])}, ["w"])
>>> round(float(s["w"][0]), 4), round(float(s["w"][1] ** 2), 4)
(2.5, 1.25)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from fedwa.core.averaging import normalise_weights

Scope = tuple[Tensor, Tensor]
ScopeTarget = tuple[float | Tensor, float | Tensor]

#: Added to the variance before the square root. d sqrt(v)/dv = 1/(2 sqrt(v)) is infinite at
#: v = 0 (e.g. a layer whose entries are all equal, like a zero-initialised bias), and the KL
#: has log(1/sigma); the epsilon keeps both finite while shifting sigma by at most 1e-6.
SCOPE_EPS = 1e-12

_CONV_LINEAR = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_SUFFIXES = (".mu", ".sigma")


def scope_layers(model: nn.Module, include: str = "weights") -> list[str]:
    """State-dict names of the tensors whose weight scopes WSA aligns.

    Parameters
    ----------
    model : torch.nn.Module
        Any model; its submodules are visited in registration order (the state-dict order).
    include : {"weights", "all"}, optional
        ``"weights"`` (default): the ``.weight`` of every ``nn.Conv1d/2d/3d`` and ``nn.Linear``,
        the tensors WSA (arXiv 2408.12237) treats as a layer's weights; biases and BatchNorm
        parameters are left out because they hold few entries that do not behave like one
        Gaussian. ``"all"``: also those layers' biases and the affine weight and bias of
        BatchNorm layers, each as its own scope, weight before bias.

    Returns
    -------
    list of str
        Parameter names, usable with ``model.state_dict()`` and ``model.named_parameters()``.

    Raises
    ------
    ValueError
        If ``include`` is not ``"weights"`` or ``"all"``.
    """
    if include not in ("weights", "all"):
        raise ValueError(f"include must be 'weights' or 'all', got {include!r}")
    names: list[str] = []
    for prefix, module in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, _CONV_LINEAR):
            names.append(f"{dot}weight")
            if include == "all" and module.bias is not None:
                names.append(f"{dot}bias")
        elif include == "all" and isinstance(module, _BATCH_NORM) and module.affine:
            names += [f"{dot}weight", f"{dot}bias"]
    return names


def scopes(
    state: Mapping[str, Tensor], names: Sequence[str], eps: float = SCOPE_EPS
) -> dict[str, Scope]:
    """Weight scope ``(mu, sigma)`` of each named tensor (WSA, arXiv 2408.12237).

    Parameters
    ----------
    state : mapping from name to tensor
        A state dict or ``dict(model.named_parameters())``.
    names : sequence of str
        The tensors to summarise, e.g. from :func:`scope_layers`.
    eps : float, optional
        Added to the variance inside the square root (see :data:`SCOPE_EPS`).

    Returns
    -------
    dict
        ``name -> (mu, sigma)``, 0-d tensors: ``mu = mean(W)`` and
        ``sigma = sqrt(mean((W - mu)^2) + eps)``, i.e. the population standard deviation.
        Nothing is detached, so they carry gradients when ``state`` holds parameters.
    """
    result: dict[str, Scope] = {}
    for name in names:
        w = state[name]
        mu = w.mean()
        # Population variance (divide by n, not n - 1): the scope describes the tensor itself,
        # and it stays defined for 1-entry tensors.
        sigma = torch.sqrt((w - mu).square().mean() + eps)
        result[name] = (mu, sigma)
    return result


def gaussian_kl(
    mu: float | Tensor,
    sigma: float | Tensor,
    mu_target: float | Tensor,
    sigma_target: float | Tensor,
) -> Tensor:
    """``KL(N(mu, sigma^2) || N(mu_target, sigma_target^2))``, elementwise.

    Parameters
    ----------
    mu, sigma : float or tensor
        Mean and standard deviation (> 0) of the first Gaussian.
    mu_target, sigma_target : float or tensor
        Mean and standard deviation (> 0) of the second (target) Gaussian.

    Returns
    -------
    torch.Tensor
        ``log(sigma_target / sigma) + (sigma^2 + (mu - mu_target)^2) / (2 sigma_target^2)
        - 1/2``, broadcast over the inputs; exactly 0 when both Gaussians are the same. This is
        the per-layer penalty of WSA (arXiv 2408.12237).
    """
    mu, sigma = torch.as_tensor(mu), torch.as_tensor(sigma)
    mu_target, sigma_target = torch.as_tensor(mu_target), torch.as_tensor(sigma_target)
    var_target = sigma_target.square()
    return (
        torch.log(sigma_target / sigma)
        + (sigma.square() + (mu - mu_target).square()) / (2 * var_target)
        - 0.5
    )


def scope_kl(
    state_or_params: Mapping[str, Tensor],
    targets: Mapping[str, ScopeTarget],
    names: Sequence[str],
) -> Tensor:
    """Sum over layers of ``KL(current scope || target scope)`` (WSA, arXiv 2408.12237).

    Parameters
    ----------
    state_or_params : mapping from name to tensor
        A state dict, or ``dict(model.named_parameters())`` for a differentiable result.
    targets : mapping from name to (mu, sigma)
        Target scope of every name in ``names``.
    names : sequence of str
        The layers to align.

    Returns
    -------
    torch.Tensor
        0-d tensor; 0 when ``names`` is empty.

    Raises
    ------
    KeyError
        If a name has no target.
    """
    missing = [n for n in names if n not in targets]
    if missing:
        raise KeyError(f"no target scope for layers {missing}")
    current = scopes(state_or_params, names)
    terms = [gaussian_kl(*current[n], *targets[n]) for n in names]
    if not terms:
        return torch.zeros(())
    # Summed in a Python loop, not torch.stack: layers may differ in dtype.
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def fuse_scopes(
    client_scopes: Sequence[Mapping[str, Scope]], weights: Sequence[float] | None = None
) -> dict[str, Scope]:
    """Fuse client scopes into target scopes by moment matching.

    With normalised client weights ``p_k`` the target of each layer is the Gaussian with the
    mean and variance of the mixture ``sum_k p_k N(mu_k, sigma_k^2)``:

        mu* = sum_k p_k mu_k,
        sigma*^2 = sum_k p_k (sigma_k^2 + mu_k^2) - mu*^2 = sum_k p_k (sigma_k^2 + (mu_k - mu*)^2).

    WSA (arXiv 2408.12237) fuses the clients' scopes on the server, but we could not confirm
    its exact rule from the paper; this moment-matched mixture is our choice. The second form
    above is the one computed: it is the same number without the cancellation of subtracting
    two large second moments.

    Parameters
    ----------
    client_scopes : sequence of mappings from name to (mu, sigma)
        One mapping per client, all with the same names; the first fixes the order.
    weights : sequence of float, optional
        Non-negative client weights (e.g. example counts), normalised here; uniform when omitted.

    Returns
    -------
    dict
        ``name -> (mu*, sigma*)`` as 0-d tensors.

    Raises
    ------
    ValueError
        If there are no clients, the weights are malformed or the clients' names differ.
    """
    p = normalise_weights(weights, len(client_scopes))
    names = list(client_scopes[0])
    for k, client in enumerate(client_scopes):
        if set(client) != set(names):
            raise ValueError(
                f"client {k} has scopes for {sorted(client)}, expected {sorted(names)}"
            )
    fused: dict[str, Scope] = {}
    for name in names:
        mus = [torch.as_tensor(c[name][0]).detach() for c in client_scopes]
        sigmas = [torch.as_tensor(c[name][1]).detach() for c in client_scopes]
        mu = sum(pk * m for pk, m in zip(p, mus))
        var = sum(pk * (s.square() + (m - mu).square()) for pk, m, s in zip(p, mus, sigmas))
        mu, var = torch.as_tensor(mu).reshape(()), torch.as_tensor(var).reshape(())
        fused[name] = (mu, torch.sqrt(var))
    return fused


def scope_regulariser(
    targets: Mapping[str, ScopeTarget], names: Sequence[str], strength: float
) -> Callable[[nn.Module], Tensor]:
    """WSA's client-side loss term, for ``fedwa.core.training.train_local(regulariser=...)``.

    Parameters
    ----------
    targets : mapping from name to (mu, sigma)
        Target scopes from the server (e.g. :func:`fuse_scopes`); copied and detached, so no
        gradient flows into them.
    names : sequence of str
        Parameter names to align, e.g. from :func:`scope_layers`.
    strength : float
        ``lambda >= 0``, the weight of the term (WSA, arXiv 2408.12237).

    Returns
    -------
    callable
        ``f(model) = strength * scope_kl(dict(model.named_parameters()), targets, names)``,
        a differentiable 0-d tensor.

    Raises
    ------
    ValueError
        If ``strength`` is negative.
    KeyError
        If a name has no target.
    """
    if not strength >= 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    names = list(names)
    missing = [n for n in names if n not in targets]
    if missing:
        raise KeyError(f"no target scope for layers {missing}")
    # Detached copies: the targets are constants of the client's loss, and later edits of the
    # caller's mapping must not change a regulariser already handed to training.
    frozen = {
        n: tuple(torch.as_tensor(v).detach().clone() for v in targets[n]) for n in names
    }

    def regulariser(model: nn.Module) -> Tensor:
        return strength * scope_kl(dict(model.named_parameters()), frozen, names)

    return regulariser


def scopes_to_tensors(s: Mapping[str, ScopeTarget]) -> dict[str, Tensor]:
    """Flatten scopes to ``{"<name>.mu": t, "<name>.sigma": t}`` with 1-element tensors.

    The flat name -> tensor form fits a Flower ``ArrayRecord`` next to the model weights;
    1-element rather than 0-d tensors because array serialisation handles them everywhere.
    """
    flat: dict[str, Tensor] = {}
    for name, (mu, sigma) in s.items():
        flat[f"{name}.mu"] = torch.as_tensor(mu).detach().reshape(1).clone()
        flat[f"{name}.sigma"] = torch.as_tensor(sigma).detach().reshape(1).clone()
    return flat


def scopes_from_tensors(d: Mapping[str, Tensor]) -> dict[str, Scope]:
    """Inverse of :func:`scopes_to_tensors`: ``name -> (mu, sigma)`` as 0-d tensors.

    Raises
    ------
    ValueError
        If a key lacks the ``.mu``/``.sigma`` suffix, a layer misses one of the two, or a value
        is not a single number.
    """
    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in d.items():
        base, dot, field = key.rpartition(".")
        if not dot or f".{field}" not in _SUFFIXES:
            raise ValueError(f"scope key {key!r} does not end in '.mu' or '.sigma'")
        t = torch.as_tensor(value)
        if t.numel() != 1:
            raise ValueError(
                f"scope entry {key!r} must hold one number, got shape {tuple(t.shape)}"
            )
        parts.setdefault(base, {})[field] = t.reshape(())
    result: dict[str, Scope] = {}
    for base, fields in parts.items():
        if set(fields) != {"mu", "sigma"}:
            raise ValueError(f"scope of {base!r} has {sorted(fields)}, expected mu and sigma")
        result[base] = (fields["mu"], fields["sigma"])
    return result

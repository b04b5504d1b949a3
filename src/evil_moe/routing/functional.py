"""Exact per-token gradient masks for parameters, in a single backward pass.

Each op computes the ordinary forward value. In the backward pass the gradient with
respect to the *input* is the ordinary one (so gradient still flows through shared
weights to earlier layers, as in SGTM), while the gradient with respect to the
*parameters* only sums the token rows whose ``keep`` is 1. A token with ``keep = 0``
therefore contributes exactly zero to the parameter's gradient, whatever else is in the
batch. ``keep`` is ``[N, 1]`` (one flag per token) or ``[N, G]`` (one flag per token and
per contiguous group of features, used for per-expert masks); ``None`` means all ones.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call


def compute_dtype(x: Tensor) -> torch.dtype | None:
    """The autocast dtype active for ``x``'s device, if any."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return None


def _expand(keep: Tensor, features: int) -> Tensor:
    """``[N, G]`` group flags to ``[N, features]`` (groups are equal, contiguous blocks)."""
    groups = keep.shape[1]
    if groups == 1:
        return keep
    return keep.repeat_interleave(features // groups, dim=1)


class DeferredKeep:
    """A per-token keep mask ``[N, 1]`` that may still change before the backward pass.

    A backward router that decides in its own backward step to withdraw tokens from the
    shared parameters (the absorption amplifier) writes the new mask into ``value``;
    shared ops whose backward runs later read it then.
    """

    def __init__(self, value: Tensor):
        self.value = value


class _RoutedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, out_keep, in_keep, deferred):  # type: ignore[override]
        ctx.deferred = deferred
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype if bias is not None else None)
        dtype = compute_dtype(x)
        if dtype is not None:
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            y = F.linear(x, weight, bias)
        ctx.save_for_backward(x, weight, out_keep, in_keep)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight, out_keep, in_keep = ctx.saved_tensors
        if ctx.deferred is not None:
            out_keep = ctx.deferred.value
        grad = grad.to(x.dtype)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = grad @ weight
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            g, xi = grad, x
            if out_keep is not None:
                mask = _expand(out_keep.to(g.dtype), g.shape[1])
                if in_keep is None and mask.shape[1] == 1 and x.shape[1] < g.shape[1]:
                    xi = x * mask  # (g*k)^T x == g^T (x*k): mask the narrower side
                else:
                    g = g * mask
            if in_keep is not None:
                xi = xi * _expand(in_keep.to(x.dtype), x.shape[1])
            if ctx.needs_input_grad[1]:
                grad_w = g.t() @ xi
            if ctx.has_bias and ctx.needs_input_grad[2]:
                # A bias sees the output mask only (in_keep cannot apply to it): the gradient
                # masked above, or masked here when the mask went to the narrower input.
                gb = grad * mask if out_keep is not None and g is grad else g
                grad_b = gb.sum(0).to(ctx.dtypes[2])
        if grad_x is not None:
            grad_x = grad_x.to(ctx.dtypes[0])
        if grad_w is not None:
            grad_w = grad_w.to(ctx.dtypes[1])
        return grad_x, grad_w, grad_b, None, None, None


def routed_linear(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    out_keep: Tensor | DeferredKeep | None = None,
    in_keep: Tensor | None = None,
) -> Tensor:
    """``F.linear`` whose weight/bias gradients only sum the kept token rows.

    ``out_keep`` ``[N, G]`` masks per token and per group of output features (a group of
    rows of ``weight``); ``in_keep`` ``[N, G]`` per group of input features (columns of
    ``weight``; the bias is not masked by it). ``x`` is ``[..., in]`` with ``N`` leading
    positions in row-major order. A :class:`DeferredKeep` ``out_keep`` is read at backward.
    """
    if out_keep is None and in_keep is None:
        return F.linear(x, weight, bias)
    deferred = out_keep if isinstance(out_keep, DeferredKeep) else None
    if deferred is not None:
        out_keep = None
    lead = x.shape[:-1]
    y = _RoutedLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias, out_keep, in_keep, deferred)
    return y.reshape(*lead, y.shape[-1])


class _CotangentMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep):  # type: ignore[override]
        ctx.save_for_backward(keep)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.dtype), None


def mask_cotangent(x: Tensor, keep: Tensor | None) -> Tensor:
    """Identity forward; backward multiplies the cotangent of each token row by ``keep``.

    Applied to a shared block output this is the gradient-routing detach (Cloud et al.):
    nothing upstream of the output receives gradient from masked tokens through it.
    Applied to an embedding lookup it masks the embedding's parameter gradient exactly,
    since nothing else is upstream of a lookup.
    """
    if keep is None:
        return x
    lead = x.shape[:-1]
    y = _CotangentMask.apply(x.reshape(-1, x.shape[-1]), keep)
    return y.reshape(*lead, x.shape[-1])


class _PerTokenParameter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p, keep, lead):  # type: ignore[override]
        ctx.save_for_backward(keep)
        ctx.param_dim = p.dim()
        return p.expand(*lead, *p.shape)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        (keep,) = ctx.saved_tensors
        rows = grad.reshape(-1, *grad.shape[grad.dim() - ctx.param_dim :])
        mask = keep.to(grad.dtype).reshape(-1, *([1] * ctx.param_dim))
        return (rows * mask).sum(0), None, None


def per_token_parameter(p: Tensor, keep: Tensor, lead: tuple[int, ...]) -> Tensor:
    """``p`` expanded (not copied) to one row per token, ``[*lead, *p.shape]``, whose
    gradient into ``p`` sums only the kept tokens' rows. A per-token module that uses its
    parameters in broadcasting elementwise ops (a norm's gain) and is called with these
    computes the same values, and its parameter gradients skip tokens with ``keep = 0``:
    one forward and one backward, no recomputation."""
    return _PerTokenParameter.apply(p, keep, tuple(lead))


def routed_module_call(module: nn.Module, x: Tensor, keep: Tensor | None) -> Tensor:
    """Any per-token module with exact per-token parameter-gradient masks, by the generic
    rule of :func:`select_kept` (for modules that have no dedicated masked op)."""
    if keep is None:
        return module(x)
    return select_kept(module, (x,), {}, module(x), keep)


def select_kept(module: nn.Module, args: tuple, kwargs: dict, live: Tensor, keep: Tensor) -> Tensor:
    """``live`` (``module``'s output for ``args``) for kept tokens, and for the others the
    output of ``module`` run again with detached parameters: its parameter gradients then
    sum only kept tokens. Exact for any module that acts on each token independently; it
    costs a second forward of the module, so it is meant for cheap elementwise modules
    (norms), not for matrix multiplies."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    frozen = functional_call(module, params, args, kwargs)
    flags = keep.reshape(*live.shape[:-1], 1).bool()
    return torch.where(flags, live, frozen)

"""Pieces the backward formulas of several op families share: the product's vector-Jacobian
product and the power-of-two scaling that carries float64 gradients through float32 work."""
from __future__ import annotations

import torch


def product_vjp(a: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, need_a: bool = True):
    """out = a @ v: (grad of a, or None when not need_a; grad of v)."""
    g = grad.to(a.dtype)
    return (g @ v.to(a.dtype).transpose(-1, -2) if need_a else None), a.transpose(-1, -2) @ g


# Exponents of the power-of-two scale in scaled_vjp whose 2^e and 2^-e are both finite doubles.
_MIN_SCALE_EXPONENT, _MAX_SCALE_EXPONENT = -1022, 1023


def scaled_vjp(vjp, g: torch.Tensor, dtype: torch.dtype):
    """vjp(g) for a map `vjp` that is linear in g and acts on each batch element (dim 0) alone,
    evaluated in `dtype` on g scaled per batch element by a power of two (max |g| in [1/2, 1)),
    and scaled back in float64 (exact). g may come from minmax_expm1_vjp in float64 with entries
    beyond the float32 range: gradients beyond it then come out +-inf, not NaN (inf - inf), and
    one batch element's scale never flushes another's. Returns vjp's tensor(s) in float64."""
    if dtype == torch.float64:
        return vjp(g.double())
    flat = g.flatten(1)
    m = torch.maximum(flat.amax(1), -flat.amin(1)).double()  # max |g| without an |g| map
    e = torch.where(torch.isfinite(m) & (m > 0), torch.frexp(m)[1], 0)
    # 2^-e and 2^e must both be finite float64 powers of two: an element whose whole gradient is
    # subnormal (e < -1021) would get 2^-e = inf and inf * 0 = NaN. Clamped, its scaled g keeps
    # every bit (a subnormal times a power of two is exact) and the result underflows as it must.
    e = e.clamp(_MIN_SCALE_EXPONENT, _MAX_SCALE_EXPONENT).double()
    # rounded to `dtype` as it is stored: no float64 copy of g (the product is exact)
    scaled = torch.mul(g, torch.exp2(-e).view(-1, *[1] * (g.dim() - 1)), out=torch.empty(g.shape, dtype=dtype,
                                                                                         device=g.device))
    out = vjp(scaled)
    scale = lambda t: t.double() * torch.exp2(e).view(-1, *[1] * (t.dim() - 1))  # noqa: E731
    return tuple(None if t is None else scale(t) for t in out) if isinstance(out, tuple) else scale(out)


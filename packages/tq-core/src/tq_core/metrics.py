"""Error metrics for KV quantization: distortion, inner-product error and bias, attention error."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["mse_distortion", "InnerProductError", "inner_product_error", "attention_relative_error"]


def _same_shape(a: torch.Tensor, b: torch.Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def mse_distortion(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean normalized squared error ``E[||x - x_hat||^2 / ||x||^2]`` over the vectors of `[..., d]`.

    For unit vectors this is the paper's ``D_mse``.
    """
    _same_shape(x, x_hat, "x and x_hat")
    x32, y32 = x.to(torch.float32), x_hat.to(torch.float32)
    num = (x32 - y32).pow(2).sum(-1)
    den = x32.pow(2).sum(-1).clamp_min(1e-30)
    return float((num / den).mean())


@dataclass(frozen=True)
class InnerProductError:
    """Error of ``<q, k_hat>`` against ``<q, k>``, normalized by ``||q|| ||k||``.

    Attributes:
        bias: mean signed error (an unbiased quantizer has ~0 on any fixed pair).
        rmse: root mean squared error.
        slope: least-squares slope of estimate vs truth (1 for unbiased; < 1 for a shrinking quantizer).
    """

    bias: float
    rmse: float
    slope: float


def inner_product_error(q: torch.Tensor, k: torch.Tensor, k_hat: torch.Tensor) -> InnerProductError:
    """Compare ``<q_i, k_hat_i>`` with ``<q_i, k_i>`` row by row (`[n, d]` each)."""
    _same_shape(k, k_hat, "k and k_hat")
    _same_shape(q, k, "q and k")
    q32, k32, h32 = (t.to(torch.float32) for t in (q, k, k_hat))
    norm = (q32.norm(dim=-1) * k32.norm(dim=-1)).clamp_min(1e-30)
    true = (q32 * k32).sum(-1) / norm
    est = (q32 * h32).sum(-1) / norm
    err = est - true
    slope = float((est * true).sum() / true.pow(2).sum().clamp_min(1e-30))
    return InnerProductError(bias=float(err.mean()), rmse=float(err.pow(2).mean().sqrt()), slope=slope)


def attention_relative_error(out: torch.Tensor, out_hat: torch.Tensor) -> float:
    """``||O - O_hat||_F / ||O||_F`` over all queries and heads."""
    _same_shape(out, out_hat, "out and out_hat")
    o, h = out.to(torch.float32), out_hat.to(torch.float32)
    return float((o - h).norm() / o.norm().clamp_min(1e-30))

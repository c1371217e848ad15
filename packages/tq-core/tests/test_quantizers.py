import math

import pytest
import torch

from tq_core import (
    OutlierSplitQuantizer,
    TurboQuantMSE,
    TurboQuantProd,
    inner_product_error,
    lloyd_max_codebook,
    mse_distortion,
    top_rms_channels,
)


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("d", [64, 80, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_mse_distortion_matches_codebook(d, bits):
    q = TurboQuantMSE(d, bits, rotation="haar", seed=bits)
    x = _unit(20_000, d, seed=d + bits) * 3.7  # any scale: the norm is kept apart
    err = mse_distortion(x, q.dequantize(q.quantize(x)))
    assert err == pytest.approx(lloyd_max_codebook(d, bits).mse_per_vector, rel=0.05)


def test_hadamard_rotation_close_to_haar_on_random_data():
    x = _unit(20_000, 128, seed=1)
    e_had = mse_distortion(x, (q := TurboQuantMSE(128, 3, rotation="hadamard")).dequantize(q.quantize(x)))
    assert e_had == pytest.approx(lloyd_max_codebook(128, 3).mse_per_vector, rel=0.05)


def test_norm_correction_keeps_norm_exactly():
    q = TurboQuantMSE(128, 2, norm_correction=True)
    x = torch.randn(500, 128) * 10
    xh = q.dequantize(q.quantize(x))
    torch.testing.assert_close(xh.norm(dim=-1), x.norm(dim=-1), rtol=1e-4, atol=1e-4)
    plain = TurboQuantMSE(128, 2)
    assert bool((plain.dequantize(plain.quantize(x)).norm(dim=-1) < x.norm(dim=-1)).float().mean() > 0.9)


def test_extra_bit_coordinates_lower_the_error():
    x = _unit(5000, 128, seed=2)
    errs = [
        mse_distortion(x, (q := TurboQuantMSE(128, 3, hi_bits_coords=h)).dequantize(q.quantize(x)))
        for h in (0, 32, 64, 128)
    ]
    assert errs[0] > errs[1] > errs[2] > errs[3]
    assert errs[3] == pytest.approx(lloyd_max_codebook(128, 4).mse_per_vector, rel=0.06)
    assert TurboQuantMSE(128, 3, hi_bits_coords=64).bits_per_coordinate == 3.5


def _correlated_pairs(n, d, rho, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, d, generator=g)
    q = rho * k + math.sqrt(1 - rho**2) * torch.randn(n, d, generator=g)
    return q, k


@pytest.mark.slow
def test_prod_is_unbiased_on_correlated_pairs_and_mse_is_not():
    # Strongly correlated query/key pairs: <q, k> / (|q||k|) ~ 0.9, so a shrinking estimator shows up.
    q, k = _correlated_pairs(20_000, 128, rho=0.9, seed=0)
    prod = TurboQuantProd(128, 2, seed=5)
    e_prod = inner_product_error(q, k, prod.dequantize(prod.quantize(k)))
    mse = TurboQuantMSE(128, 2, seed=5)
    e_mse = inner_product_error(q, k, mse.dequantize(mse.quantize(k)))
    # MSE quantizer at the same 2 bits: estimates shrink by (1 - D) on average (D = 0.116)
    assert e_mse.slope == pytest.approx(1 - lloyd_max_codebook(128, 2).mse_per_vector, abs=0.02)
    assert e_mse.bias < -0.05
    # prod: unbiased, the mean error is within a few standard errors of zero
    se = e_prod.rmse / math.sqrt(20_000)
    assert abs(e_prod.bias) < 4 * se
    assert e_prod.slope == pytest.approx(1.0, abs=0.02)


def test_prod_bad_bits():
    with pytest.raises(ValueError, match="bits >= 2"):
        TurboQuantProd(128, 1)


def test_outlier_split_uses_the_requested_bits_and_helps_on_outlier_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 128, generator=g)
    x[:, :8] *= 30  # outlier channels
    ch = top_rms_channels(x, 32)
    assert set(range(8)) <= set(ch.tolist())
    split = OutlierSplitQuantizer(128, ch, bits_outlier=4, bits=3)
    assert split.bits_per_coordinate == 3.25
    e_split = mse_distortion(x, split.dequantize(split.quantize(x)))
    plain = TurboQuantMSE(128, 3)
    assert e_split < mse_distortion(x, plain.dequantize(plain.quantize(x)))
    with pytest.raises(ValueError, match="distinct channel"):
        OutlierSplitQuantizer(128, torch.tensor([1, 1, 2]), 4, 3)


def test_nonfinite_raise_and_propagate():
    q = TurboQuantMSE(64, 4)
    x = torch.randn(6, 64)
    x[2, 5] = float("nan")
    x[4, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        q.quantize(x)
    codes = q.quantize(x, nonfinite="propagate")
    out = q.dequantize(codes)
    bad = torch.tensor([False, False, True, False, True, False])
    assert bool(out[bad].isnan().all())
    clean = q.dequantize(q.quantize(x[~bad]))
    torch.testing.assert_close(out[~bad], clean)  # neighbours are untouched


@pytest.mark.parametrize("make", [lambda: TurboQuantMSE(64, 3), lambda: TurboQuantProd(64, 3)])
def test_norm_overflowing_float32_raises_or_saturates(make):
    q = make()
    x = torch.randn(3, 64)
    x[1] *= 1e30  # finite, but ||x||^2 overflows float32: the direction would be lost
    with pytest.raises(
        ValueError, match=r"1 finite vector\(s\) whose norm overflows float32.*scale the input"
    ):
        q.quantize(x)
    q.quantize(x, nonfinite="propagate")  # the kernels' mode does not raise


def test_zero_vector_decodes_to_zero():
    q = TurboQuantMSE(64, 3, norm_correction=True)
    out = q.dequantize(q.quantize(torch.zeros(2, 64)))
    assert torch.equal(out, torch.zeros(2, 64))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 0}, "bits must be"),
        ({"bits": 9}, "bits must be"),
        ({"d": 1}, "d must be"),
        ({"hi_bits_coords": 200}, "hi_bits_coords"),
        ({"bits": 8, "hi_bits_coords": 8}, "bits < 8"),
    ],
)
def test_bad_construction(kwargs, match):
    args = {"d": 128, "bits": 4} | kwargs
    with pytest.raises(ValueError, match=match):
        TurboQuantMSE(args.pop("d"), args.pop("bits"), **args)


def test_bad_tensors():
    q = TurboQuantMSE(128, 4)
    with pytest.raises(ValueError, match="floating dtype"):
        q.quantize(torch.ones(3, 128, dtype=torch.int64))
    with pytest.raises(ValueError, match="last dimension 128"):
        q.quantize(torch.ones(3, 64))
    with pytest.raises(ValueError, match="'raise' or 'propagate'"):
        q.quantize(torch.ones(3, 128), nonfinite="ignore")  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_accepts_float_dtypes(dtype):
    q = TurboQuantMSE(64, 4)
    x = torch.randn(10, 64).to(dtype)
    assert q.dequantize(q.quantize(x)).dtype == torch.float32

"""Property-based tests (hypothesis): packing, format construction, extreme vectors, corrupted slots.

Each property states a contract of the public API for inputs a user could pass:

* packing round-trips at 1..8 bits for any shape, and out-of-range indices raise ``ValueError``;
* :func:`named_format` accepts every valid argument and raises ``ValueError`` (never a deep
  ``TypeError``/``AttributeError``) for anything else;
* :meth:`KVFormat.encode` of vectors of any norm: raises ``ValueError`` exactly where the stored norm
  would not fit (:data:`tq_core.NORM_RANGE`, float16: 65504) or the input is not finite, and otherwise
  keeps the norm (relative 1e-3 for normal float16 norms, absolute 2**-25 below); ``"propagate"``
  never raises and marks only non-finite vectors NaN;
* decoding random bytes never crashes, and a row decodes finite exactly when its stored norm is finite.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tq_core import NORM_RANGE, KVFormat, format_names, named_format
from tq_core.packing import pack_bits, pack_planes, packed_bytes, planes_bytes, unpack_bits, unpack_planes

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FP16_MAX = NORM_RANGE["float16"][1]
VALID_ROT = ("hadamard", "haar")
D = 64  # head_dim of the encode properties: small enough to keep the module fast

shapes = st.lists(st.integers(0, 3), min_size=0, max_size=2)
seeds = st.integers(0, 2**31 - 1)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- packing -----------------------------------------------------------------------------------
@FUZZ
@given(
    bits=st.integers(1, 8),
    lead=shapes,
    n=st.integers(0, 70),
    seed=seeds,
    dtype=st.sampled_from(["u8", "i64"]),
)
def test_pack_round_trips(bits, lead, n, seed, dtype):
    idx = torch.randint(0, 2**bits, (*lead, n), generator=_gen(seed))
    idx = idx.to(torch.uint8 if dtype == "u8" else torch.int64)
    dense, planes = pack_bits(idx, bits), pack_planes(idx, bits)
    assert dense.shape == (*lead, packed_bytes(n, bits)) and dense.dtype == torch.uint8
    assert planes.shape == (*lead, planes_bytes(n, bits))
    assert torch.equal(unpack_bits(dense, bits, n), idx.to(torch.uint8))
    assert torch.equal(unpack_planes(planes, bits, n), idx.to(torch.uint8))


@FUZZ
@given(
    bits=st.integers(1, 8),
    values=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=20),
    plane=st.booleans(),
)
def test_pack_rejects_exactly_the_out_of_range_indices(bits, values, plane):
    pack = pack_planes if plane else pack_bits
    if all(0 <= x < 2**bits for x in values):
        packed = pack(torch.tensor(values), bits)
        unpack = unpack_planes if plane else unpack_bits
        assert unpack(packed, bits, len(values)).tolist() == values
    else:
        with pytest.raises(ValueError, match=rf"0\.\.{2**bits - 1} for {bits} bits"):
            pack(torch.tensor(values), bits)


# -- format construction -----------------------------------------------------------------------
junk = st.one_of(
    st.none(),
    st.booleans(),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=2),
    st.tuples(st.integers()),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=1),
)


@FUZZ
@given(
    name=st.sampled_from(format_names()),
    head_dim=st.integers(2, 300),
    seed=st.integers(-(2**70), 2**70),
    rotation=st.sampled_from(VALID_ROT),
)
def test_named_format_accepts_every_valid_argument(name, head_dim, seed, rotation):
    if head_dim % 8:  # plane padding may overflow the budget (k8v4 at 5, 9, 13, ...): said clearly
        try:
            named_format(name, head_dim, seed=seed, rotation=rotation)
        except ValueError as e:
            assert "multiple of 8" in str(e)
        return
    fmt = named_format(name, head_dim, seed=seed, rotation=rotation)
    assert isinstance(fmt, KVFormat) and fmt.head_dim == head_dim and fmt.name == name
    assert fmt.used_bytes <= fmt.slot_bytes


@FUZZ
@given(which=st.sampled_from(["name", "head_dim", "seed", "rotation"]), bad=junk)
def test_named_format_rejects_anything_else_with_value_error(which, bad):
    args = {"name": "turboquant_4bit_nc", "head_dim": 128, "seed": 0, "rotation": "hadamard"}
    if which == "head_dim" and isinstance(bad, int) and not isinstance(bad, bool) and bad >= 2:
        bad = 1 - bad  # an integer >= 2 is a valid head_dim; use one that is not
    assume(not (which == "name" and bad in format_names()) and not (which == "rotation" and bad in VALID_ROT))
    args[which] = bad
    with pytest.raises(ValueError):
        named_format(args.pop("name"), args.pop("head_dim"), **args)


# -- encode / decode of extreme vectors --------------------------------------------------------
def _vectors(log_norms: list[float | None], seed: int) -> torch.Tensor:
    """Float32 rows of the given norms (10**log_norm, None: a zero row) in random directions."""
    x = torch.randn(len(log_norms), D, generator=_gen(seed), dtype=torch.float64)
    x = x / x.norm(dim=-1, keepdim=True)
    scale = torch.tensor([0.0 if e is None else 10.0**e for e in log_norms], dtype=torch.float64)
    with torch.no_grad():
        return (x * scale[:, None]).to(torch.float32)  # beyond float32's range: inf entries


log_norm = st.one_of(st.none(), st.floats(-48, 42), st.floats(4.6, 5.0))  # 4.6..5.0: around 65504


@FUZZ
@given(
    name=st.sampled_from(format_names()),
    logs=st.lists(log_norm, min_size=1, max_size=4),
    seed=seeds,
    nan_row=st.booleans(),
)
def test_encode_keeps_norms_or_raises_where_storage_cannot(name, logs, seed, nan_row):
    fmt = named_format(name, D)
    k = _vectors(logs, seed)
    if nan_row:
        k[0, seed % D] = math.nan
    v = torch.randn(k.shape, generator=_gen(seed + 1))
    true = _vectors(logs, seed).to(torch.float64).norm(dim=-1)  # before float32 overflow/underflow
    finite = torch.isfinite(k).all(-1)
    norm32 = k.norm(dim=-1)
    # margins around 65504: the stored norm is ||k|| / ||c[codes]||, and ||c[codes]|| is close to 1
    must_raise = bool((~finite).any() or (~torch.isfinite(norm32)).any() or (true > 1.25 * FP16_MAX).any())
    may_raise = must_raise or bool((true > 0.8 * FP16_MAX).any())
    try:
        kd, vd = fmt.decode(fmt.encode(k, v))
    except ValueError as e:
        assert may_raise, f"raised for storable norms {true.tolist()}: {e}"
        assert any(s in str(e) for s in ("non-finite", "overflows float32", "65504")), str(e)
    else:
        assert not must_raise, f"stored norms {true.tolist()} silently"
        assert bool(torch.isfinite(kd).all()) and bool(torch.isfinite(vd).all())
        got = kd.to(torch.float64).norm(dim=-1)
        err = (got - true).abs()
        fp16_normal = NORM_RANGE["float16"][0] * 2**10
        assert bool((err <= torch.maximum(2e-3 * true, torch.full_like(true, 2.0**-24))).all()), (true, got)
        assert bool(((true >= fp16_normal) | (err <= 2.0**-24)).all())
        assert torch.equal(kd[true == 0], torch.zeros_like(kd[true == 0]))  # zero rows stay exact

    # "propagate" (the kernels' mode) never raises: NaN rows exactly where the input was not finite
    kd, _ = fmt.decode(fmt.encode(k, v, nonfinite="propagate"))
    assert torch.equal(kd.isnan().all(-1), ~finite)
    assert bool(torch.isfinite(kd[finite]).all())
    assert bool((kd[finite].norm(dim=-1) <= 1.25 * FP16_MAX).all())  # saturated, never inf


# -- corrupted slots ---------------------------------------------------------------------------
@FUZZ
@given(name=st.sampled_from(format_names()), d=st.sampled_from([32, 64]), n=st.integers(1, 6), seed=seeds)
def test_random_bytes_decode_without_crashing(name, d, n, seed):
    fmt = named_format(name, d)
    slots = torch.randint(0, 256, (n, fmt.slot_bytes), generator=_gen(seed), dtype=torch.uint8)
    kc, vc = fmt.decode_codes(slots)
    for codes, comp in ((kc, fmt.key), (vc, fmt.value)):
        assert int(codes.idx.max()) < 2 ** (comp.bits + (1 if comp.hi_bits_coords else 0))
    kd, vd = fmt.decode(slots)
    assert kd.shape == vd.shape == (n, d) and kd.dtype == torch.float32
    # a row is finite exactly when its stored float16 norm is (random bytes may spell NaN or Inf)
    assert torch.equal(torch.isfinite(kd).all(-1), torch.isfinite(kc.gamma))
    assert torch.equal(torch.isfinite(vd).all(-1), torch.isfinite(vc.gamma))
    # the same bytes as a paged cache region, read through a random block table
    cache = torch.randint(0, 256, fmt.cache_shape(3, 4, 2), generator=_gen(seed + 1), dtype=torch.uint8)
    table = torch.randint(0, 3, (3,), generator=_gen(seed + 2))
    gk, _ = fmt.gather_paged(cache, table, 4 * 3 - seed % 4)
    assert gk.shape == (12 - seed % 4, 2, d)

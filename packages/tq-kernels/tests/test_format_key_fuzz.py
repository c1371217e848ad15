"""Property-based tests (hypothesis) of the format key that custom ops pass around.

* Every valid :class:`~tq_core.formats.KVFormat` survives ``format_key`` -> ``lookup_format`` even in a
  process where it was never registered (the key is parsed back, field by field).
* Any other string, including a valid key with one field replaced by junk, gives back a format or
  raises ``ValueError``, never a deeper error.

Pure Python: no kernel runs here.
"""

from __future__ import annotations

from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tq_core import ComponentFormat, KVFormat, named_format
from tq_kernels.ops import _registry
from tq_kernels.ops._registry import format_key, lookup_format

FUZZ = settings(max_examples=80, deadline=None)


@st.composite
def components(draw: st.DrawFn, head_dim: int) -> ComponentFormat:
    bits = draw(st.integers(1, 8))
    hi = 0 if bits == 8 else draw(st.integers(0, head_dim // 8)) * 8
    norm_dtype = draw(st.sampled_from(["float16", "bfloat16", "float32"]))
    return ComponentFormat(bits, hi, norm_dtype, draw(st.booleans()))


@st.composite
def formats(draw: st.DrawFn) -> KVFormat:
    d = draw(st.integers(2, 300))
    key, value = draw(components(d)), draw(components(d))
    used = KVFormat(d, key, value).used_bytes
    slot = draw(st.one_of(st.just(0), st.integers(used, used + 64)))
    return KVFormat(
        d,
        key,
        value,
        slot,
        name=draw(st.text(max_size=20)),  # any text, "/" included: the name is the key's last field
        rotation=draw(st.sampled_from(["hadamard", "haar"])),
        seed=draw(st.integers(-(2**64), 2**64)),
    )


@FUZZ
@given(fmt=formats())
def test_every_format_round_trips_through_its_key(fmt):
    key = format_key(fmt)
    with mock.patch.object(_registry, "_FORMATS", {}):  # as in a process that never registered it
        assert lookup_format(key) == fmt


_VALID_KEY = format_key(named_format("turboquant_4bit_nc", 128))


@FUZZ
@given(field=st.integers(0, len(_VALID_KEY.split("/")) - 1), junk=st.text(max_size=12), whole=st.booleans())
def test_malformed_keys_raise_value_error(field, junk, whole):
    parts = _VALID_KEY.split("/")
    key = junk if whole else "/".join([*parts[:field], junk, *parts[field + 1 :]])
    with mock.patch.object(_registry, "_FORMATS", {}):
        try:
            fmt = lookup_format(key)
        except ValueError as e:
            assert "format key" in str(e)
        else:
            assert isinstance(fmt, KVFormat)


def test_non_format_is_rejected():
    with pytest.raises(ValueError, match="KVFormat"):
        format_key("turboquant_4bit_nc")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "key", [None, 128, b"tq-fmt/v1", ["tq-fmt/v1"], named_format("turboquant_4bit_nc", 128)]
)
def test_non_string_key_raises_type_error(key):
    with pytest.raises(TypeError, match="format_key"):
        lookup_format(key)  # type: ignore[arg-type]

"""KVFormat <-> a stable string key, so custom ops (which take only primitive arguments) can name a format.

The key spells out every field of the format (``tq-fmt/v1/d128/k4.0.float16.1/v4.0.float16.1/s134/
hadamard/0/turboquant_4bit_nc``), so it is the same in every process and a key that reaches a custom op
before its format was registered here (a graph compiled in another process, say) still resolves.

Example:
    >>> from tq_core import named_format
    >>> fmt = named_format("turboquant_4bit_nc", 128)
    >>> key = format_key(fmt)
    >>> key
    'tq-fmt/v1/d128/k4.0.float16.1/v4.0.float16.1/s134/hadamard/0/turboquant_4bit_nc'
    >>> lookup_format(key) == fmt
    True
"""

from __future__ import annotations

from tq_core.formats import ComponentFormat, KVFormat

__all__ = ["format_key", "lookup_format"]

_PREFIX = "tq-fmt/v1"
_FORMATS: dict[str, KVFormat] = {}


def _component_key(c: ComponentFormat) -> str:
    return f"{c.bits}.{c.hi_bits_coords}.{c.norm_dtype}.{int(c.norm_correction)}.{int(c.gain_search)}"


def format_key(fmt: KVFormat) -> str:
    """Register ``fmt`` and return its key."""
    if not isinstance(fmt, KVFormat):
        raise ValueError(f"fmt must be a tq_core KVFormat, got {type(fmt).__name__}")
    key = (
        f"{_PREFIX}/d{fmt.head_dim}/k{_component_key(fmt.key)}/v{_component_key(fmt.value)}"
        f"/s{fmt.slot_bytes}/{fmt.rotation}/{fmt.seed}/{fmt.name}"
    )
    _FORMATS.setdefault(key, fmt)
    return key


def _parse_component(text: str) -> ComponentFormat:
    bits, hi, norm_dtype, nc, gs = text.split(".")
    return ComponentFormat(
        int(bits),
        int(hi),
        norm_dtype,  # type: ignore[arg-type]  # validated by ComponentFormat itself
        _flag(nc, "norm correction"),
        gain_search=_flag(gs, "gain search"),
    )


def _flag(text: str, what: str) -> bool:
    if text not in ("0", "1"):
        raise ValueError(f"the {what} flag must be 0 or 1, got {text!r}")
    return text == "1"


def lookup_format(key: str) -> KVFormat:
    """The format of ``key`` (from :func:`format_key`), rebuilt from the key if it was never registered."""
    if not isinstance(key, str):
        raise TypeError(
            f"key must be the str that format_key(fmt) returns, got {type(key).__name__}; "
            "to look up a KVFormat by name use tq_core.named_format"
        )
    fmt = _FORMATS.get(key)
    if fmt is not None:
        return fmt
    parts = key.split("/", 8)
    if len(parts) != 9 or "/".join(parts[:2]) != _PREFIX:
        raise ValueError(f"{key!r} is not a TurboQuant format key (expected one made by format_key)")
    try:
        d, k, v, s, rotation, seed, name = parts[2:]
        fmt = KVFormat(
            int(d.removeprefix("d")),
            _parse_component(k.removeprefix("k")),
            _parse_component(v.removeprefix("v")),
            int(s.removeprefix("s")),
            name=name,
            rotation=rotation,  # type: ignore[arg-type]  # validated by KVFormat itself
            seed=int(seed),
        )
    except ValueError as e:
        raise ValueError(f"malformed TurboQuant format key {key!r}: {e}") from e
    return _FORMATS.setdefault(key, fmt)

"""KV-cache formats: what one token-head slot holds, where, and the reference paged encode/decode.

A slot stores the key and the value of one token for one KV head::

    offset 0                      key codes     (d*bk + hk) / 8 bytes (bk-bit, first hk coords bk+1)
    key_code_bytes                value codes   (d*bv + hv) / 8 bytes
    key_norm_offset (aligned)     key gamma     float16 / bfloat16 / float32
    value_norm_offset (aligned)   value gamma   float16 / bfloat16 / float32
    ...                           zero padding up to slot_bytes

Codes are in the plane layout of :func:`tq_core.packing.pack_planes` (a 3-bit component is a dense
2-bit stream followed by a dense 1-bit stream).  A paged cache is a uint8 tensor `[num_blocks, num_kv_heads, block_size, slot_bytes]`: for each (block,
head) one contiguous region of ``block_size * slot_bytes`` bytes that stores its tokens' fields as
arrays (all K code rows, all V code rows, all K norms, all V norms, padding; :meth:`KVFormat.region_offsets`)
so that kernels read tiles with aligned vector loads (a 134-byte slot per row would leave every row
2-byte aligned).  The page holds exactly ``block_size * num_kv_heads * slot_bytes`` bytes, as vLLM sizes
it.  Token ``t`` of a sequence lives at slot ``block_table[t // block_size] * block_size + t % block_size``.

Both K and V of layer ``l`` are rotated by ``make_rotation(d, fmt.rotation, layer_seed(fmt.seed, l))``.
Attention never needs to un-rotate keys: ``<q, k_hat> = gamma_k <R q, c[codes_k]>``, and the output is
rotated back once, ``o = R^T sum_j p_j gamma_vj c[codes_vj]``.

Named formats have the bytes per token-head of vLLM's TurboQuant presets (:mod:`tq_core.presets`, whose
names this module re-exports), with
the layout inside the budget chosen by measurement (``turboquant eval``; experiments/results/).
Budgets for other head dims follow vLLM's rule: packed code bytes scale with ``d``, metadata does not.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch

from tq_core._validate import check_bits, check_float_tensor, check_head_dim, check_int, check_last_dim
from tq_core.packing import pack_planes, planes_bytes, unpack_planes
from tq_core.presets import PRESET_NAMES_NOTE, VLLM_PRESETS, budget_bytes, vllm_layout
from tq_core.quantizers import MSECodes, NonFinite, TurboQuantMSE
from tq_core.rotations import RotationKind, layer_seed, make_rotation

__all__ = [
    "ComponentFormat",
    "KVFormat",
    "NORM_RANGE",
    "NormDtype",
    "PRESET_NAMES_NOTE",
    "VLLM_PRESETS",
    "budget_bytes",
    "named_format",
    "format_names",
    "vllm_layout",
]

NormDtype = Literal["float16", "bfloat16", "float32"]
_NORM_TORCH = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

#: ``(smallest non-zero, largest)`` norm each norm dtype stores: float16 ``(2**-24 ~ 6e-8, 65504)``.
#: :meth:`KVFormat.encode` raises on a larger norm; ``nonfinite="propagate"`` (and the kernels) saturate
#: float16 there instead.  A norm below half the smallest stores as 0: its vector decodes as zeros (a zero
#: vector is exact); between that and the smallest normal float16 (6.1e-5) it keeps fewer than 11 bits.
NORM_RANGE: dict[str, tuple[float, float]] = {
    name: (float(torch.finfo(t).tiny * torch.finfo(t).eps), float(torch.finfo(t).max))
    for name, t in _NORM_TORCH.items()
}


@dataclass(frozen=True)
class ComponentFormat:
    """How the key (or the value) of one token-head is stored.

    Attributes:
        bits: bits per rotated coordinate, 1..8.
        hi_bits_coords: the first ``hi_bits_coords`` rotated coordinates get ``bits + 1`` bits; a multiple
            of 8 so both segments start on a byte.
        norm_dtype: dtype of the stored scale ``gamma``; its range is :data:`NORM_RANGE` (float16: up
            to 65504).
        norm_correction: store ``||x|| / ||c[codes]||`` so decoded vectors keep their norm.
        gain_search: encode with :class:`~tq_core.quantizers.TurboQuantMSE`'s gain search (the codes
            of the best gain of :data:`~tq_core.quantizers.GAIN_GRID`); the stored bytes decode the same
            way either way, only the encoder differs.
    """

    bits: int
    hi_bits_coords: int = 0
    norm_dtype: NormDtype = "float16"
    norm_correction: bool = True
    gain_search: bool = True

    def __post_init__(self) -> None:
        check_bits(self.bits)
        check_int(self.hi_bits_coords, "hi_bits_coords")
        if self.hi_bits_coords < 0 or self.hi_bits_coords % 8:
            raise ValueError(
                f"hi_bits_coords must be a non-negative multiple of 8, got {self.hi_bits_coords}"
            )
        if self.hi_bits_coords and self.bits == 8:
            raise ValueError("hi_bits_coords needs bits < 8")
        if not isinstance(self.norm_dtype, str) or self.norm_dtype not in _NORM_TORCH:
            raise ValueError(f"norm_dtype must be one of {list(_NORM_TORCH)}, got {self.norm_dtype!r}")
        if not isinstance(self.norm_correction, bool):
            raise ValueError(f"norm_correction must be True or False, got {self.norm_correction!r}")
        if not isinstance(self.gain_search, bool):
            raise ValueError(f"gain_search must be True or False, got {self.gain_search!r}")

    def code_bytes(self, d: int) -> int:
        h = self.hi_bits_coords
        if h > d:
            raise ValueError(f"hi_bits_coords={h} exceeds head_dim {d}")
        return (planes_bytes(h, self.bits + 1) if h else 0) + planes_bytes(d - h, self.bits)

    @property
    def norm_bytes(self) -> int:
        return _NORM_TORCH[self.norm_dtype].itemsize

    @property
    def torch_norm_dtype(self) -> torch.dtype:
        return _NORM_TORCH[self.norm_dtype]

    def describe(self, d: int) -> str:
        extra = f"+{self.hi_bits_coords}" if self.hi_bits_coords else ""
        nc = "" if self.norm_correction else ",raw-norm"
        gs = "" if self.gain_search else ",nearest"
        return f"{self.bits}b{extra}({self.bits + self.hi_bits_coords / d:.3g}){nc}{gs}"


def _check_rotation(rotation: object) -> None:
    kinds = get_args(RotationKind)
    if not isinstance(rotation, str) or rotation not in kinds:
        raise ValueError(f"rotation must be one of {list(kinds)}, got {rotation!r}")


def _align(x: int, a: int) -> int:
    return (x + a - 1) // a * a


@dataclass(frozen=True)
class KVFormat:
    """A TurboQuant KV slot layout for one head_dim.

    Args:
        head_dim: ``d``.
        key, value: :class:`ComponentFormat` of K and V.
        slot_bytes: bytes per token-head including padding; 0 means exactly the used bytes.
        name: a label.
        rotation: rotation kind shared by K and V.
        seed: base seed; layer ``l`` uses ``layer_seed(seed, l)``.

    Example:
        >>> fmt = named_format("turboquant_4bit_nc", 128)
        >>> fmt.slot_bytes
        134
        >>> k, v = torch.randn(5, 8, 128), torch.randn(5, 8, 128)
        >>> k2, v2 = fmt.decode(fmt.encode(k, v))
        >>> k2.shape
        torch.Size([5, 8, 128])
    """

    head_dim: int
    key: ComponentFormat
    value: ComponentFormat
    slot_bytes: int = 0
    name: str = ""
    rotation: RotationKind = "hadamard"
    seed: int = 0
    key_norm_offset: int = field(init=False)
    value_norm_offset: int = field(init=False)
    used_bytes: int = field(init=False)

    def __post_init__(self) -> None:
        check_head_dim(self.head_dim, "head_dim")
        for what, comp in (("key", self.key), ("value", self.value)):
            if not isinstance(comp, ComponentFormat):
                raise ValueError(f"{what} must be a ComponentFormat, got {type(comp).__name__}")
        check_int(self.slot_bytes, "slot_bytes", 0)
        check_int(self.seed, "seed")
        if not isinstance(self.name, str):
            raise ValueError(f"name must be a string, got {type(self.name).__name__}")
        _check_rotation(self.rotation)
        kc, vc = self.key.code_bytes(self.head_dim), self.value.code_bytes(self.head_dim)
        kn = _align(kc + vc, self.key.norm_bytes)
        vn = _align(kn + self.key.norm_bytes, self.value.norm_bytes)
        used = vn + self.value.norm_bytes
        object.__setattr__(self, "key_norm_offset", kn)
        object.__setattr__(self, "value_norm_offset", vn)
        object.__setattr__(self, "used_bytes", used)
        if self.slot_bytes == 0:
            object.__setattr__(self, "slot_bytes", used)
        elif self.slot_bytes < used:
            raise ValueError(
                f"format {self.name or '(unnamed)'} needs {used} bytes per token-head at head_dim "
                f"{self.head_dim} (K {self.key.describe(self.head_dim)}, V {self.value.describe(self.head_dim)})"
                f" but its budget is {self.slot_bytes}; lower the bits or raise the budget"
            )

    # -- layout ---------------------------------------------------------------------------------
    @property
    def key_code_offset(self) -> int:
        return 0

    @property
    def value_code_offset(self) -> int:
        return self.key.code_bytes(self.head_dim)

    @property
    def bits_per_value(self) -> float:
        """Average stored bits per K/V element, metadata and padding included."""
        return self.slot_bytes * 8 / (2 * self.head_dim)

    def describe(self) -> str:
        return (
            f"{self.name or 'KVFormat'}: d={self.head_dim}, K {self.key.describe(self.head_dim)}, "
            f"V {self.value.describe(self.head_dim)}, {self.slot_bytes} B/token-head"
        )

    def cache_shape(self, num_blocks: int, block_size: int, num_kv_heads: int) -> tuple[int, int, int, int]:
        """Shape of a paged cache: `[num_blocks, num_kv_heads, block_size, slot_bytes]` (head-major).

        The last two dimensions are one contiguous region of ``block_size * slot_bytes`` bytes per
        (block, head), laid out by :meth:`region_offsets`, not one slot per row.
        """
        for n, v in (("num_blocks", num_blocks), ("block_size", block_size), ("num_kv_heads", num_kv_heads)):
            if v < 1:
                raise ValueError(f"{n} must be >= 1, got {v}")
        return (num_blocks, num_kv_heads, block_size, self.slot_bytes)

    def region_offsets(self, block_size: int) -> tuple[int, int, int, int]:
        """Byte offsets of (K codes, V codes, K norms, V norms) inside one (block, head) region.

        A region stores its ``block_size`` tokens as arrays: all K code rows (``key.code_bytes`` each),
        all V code rows, all K norms, all V norms, then zero padding; so a kernel reads a tile of codes
        or norms with aligned, contiguous vector loads.  Token ``t`` of the block uses row ``t`` of
        each array.
        """
        d = self.head_dim
        kc, vc = self.key.code_bytes(d), self.value.code_bytes(d)
        k_norm = _align(block_size * (kc + vc), self.key.norm_bytes)
        v_norm = _align(k_norm + block_size * self.key.norm_bytes, self.value.norm_bytes)
        return 0, block_size * kc, k_norm, v_norm

    def allocate_cache(
        self, num_blocks: int, block_size: int, num_kv_heads: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """A zeroed paged cache `[num_blocks, num_kv_heads, block_size, slot_bytes]` (uint8)."""
        return torch.zeros(
            self.cache_shape(num_blocks, block_size, num_kv_heads), dtype=torch.uint8, device=device
        )

    # -- quantizers -----------------------------------------------------------------------------
    def quantizers(self, layer: int = 0) -> tuple[TurboQuantMSE, TurboQuantMSE]:
        """The reference (key, value) quantizers of ``layer``."""
        return _quantizers(self, int(layer))

    def rotation_matrix(self, layer: int = 0) -> torch.Tensor:
        """float32 `[d, d]` rotation of ``layer`` (``y = x @ R.T``), shared by K and V."""
        return make_rotation(self.head_dim, self.rotation, layer_seed(self.seed, layer)).matrix

    # -- encode / decode ------------------------------------------------------------------------
    def encode(
        self, k: torch.Tensor, v: torch.Tensor, *, layer: int = 0, nonfinite: NonFinite = "raise"
    ) -> torch.Tensor:
        """Encode K and V `[..., d]` (same shape) into slots uint8 `[..., slot_bytes]`.

        Args:
            k, v: float tensors of one shape `[..., d]`.
            layer: the layer (selects the rotation).
            nonfinite: ``"raise"`` (default) or ``"propagate"``, see below.

        Raises:
            ValueError: with ``nonfinite="raise"``: ``k`` or ``v`` holds a NaN/Inf, or a vector whose
                stored norm ``gamma`` (``||x|| / ||c[codes]||`` with norm correction, a few percent above
                ``||x||``) exceeds what ``norm_dtype`` holds (:data:`NORM_RANGE`, float16: 65504).  Scale
                the inputs down (a model's K/V norms are normally far below that) or store norms as
                bfloat16/float32.  With ``"propagate"`` (the kernels' behaviour, used by
                :meth:`store_paged`) a vector holding NaN/Inf gets a NaN norm instead, and a float16 norm
                past 65504 saturates at 65504.

        Norms below the smallest non-zero value of ``norm_dtype`` (float16: about 6e-8) store as 0, so
        such a vector decodes as the zero vector (exact for a zero vector).
        """
        check_float_tensor(k, "k")
        check_float_tensor(v, "v")
        check_last_dim(k, self.head_dim, "k")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
        qk, qv = self.quantizers(layer)
        out = torch.zeros(*k.shape[:-1], self.slot_bytes, dtype=torch.uint8, device=k.device)
        for name, comp, q, x, code_off, norm_off in (
            ("k", self.key, qk, k, self.key_code_offset, self.key_norm_offset),
            ("v", self.value, qv, v, self.value_code_offset, self.value_norm_offset),
        ):
            try:
                codes = q.quantize(x, nonfinite=nonfinite)
            except ValueError as e:  # the quantizer names its input x
                msg = str(e)
                raise ValueError(name + msg[1:] if msg.startswith("x ") else msg) from None
            if nonfinite == "raise":
                _check_norm_range(codes.gamma, comp, name)
            packed = _pack_codes(codes.idx, comp, self.head_dim)
            out[..., code_off : code_off + packed.shape[-1]] = packed
            out[..., norm_off : norm_off + comp.norm_bytes] = _norm_to_bytes(codes.gamma, comp)
        return out

    def decode_codes(self, slots: torch.Tensor) -> tuple[MSECodes, MSECodes]:
        """Unpack slots `[..., slot_bytes]` into (key, value) codes without dequantizing."""
        self._check_slots(slots)
        res = []
        for comp, code_off, norm_off in (
            (self.key, self.key_code_offset, self.key_norm_offset),
            (self.value, self.value_code_offset, self.value_norm_offset),
        ):
            nb = comp.code_bytes(self.head_dim)
            idx = _unpack_codes(slots[..., code_off : code_off + nb], comp, self.head_dim)
            gamma = _bytes_to_norm(slots[..., norm_off : norm_off + comp.norm_bytes], comp)
            res.append(MSECodes(idx=idx, gamma=gamma))
        return res[0], res[1]

    def decode(self, slots: torch.Tensor, *, layer: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode slots `[..., slot_bytes]` into float32 (K, V) `[..., d]`."""
        kc, vc = self.decode_codes(slots)
        qk, qv = self.quantizers(layer)
        return qk.dequantize(kc), qv.dequantize(vc)

    def _check_slots(self, slots: object) -> None:
        if not isinstance(slots, torch.Tensor) or slots.dtype != torch.uint8:
            raise ValueError("slots must be a uint8 tensor")
        if slots.shape[-1] != self.slot_bytes:
            raise ValueError(f"slots must have last dimension {self.slot_bytes}, got {tuple(slots.shape)}")

    # -- paged cache ----------------------------------------------------------------------------
    def _check_cache(self, cache: object) -> torch.Tensor:
        if not isinstance(cache, torch.Tensor) or cache.dtype != torch.uint8 or cache.dim() != 4:
            raise ValueError(
                "cache must be a uint8 tensor [num_blocks, num_kv_heads, block_size, slot_bytes]"
            )
        if cache.shape[-1] != self.slot_bytes:
            raise ValueError(
                f"cache slot size {cache.shape[-1]} does not match format {self.name!r} ({self.slot_bytes} B)"
            )
        if cache.stride(3) != 1 or cache.stride(2) != self.slot_bytes:
            raise ValueError(
                "each (block, head) region of the cache must be contiguous (strides [..., slot_bytes, 1])"
            )
        nb, hkv, bs, _ = cache.shape
        return cache.view(nb, hkv, bs * self.slot_bytes)

    def _region_map(self, block_size: int, device: torch.device) -> torch.Tensor:
        """int64 `[block_size, slot_bytes]`: where byte ``p`` of token ``t``'s encoded slot lives in its region."""
        return _region_map(self, block_size, str(device))

    def store_paged(
        self,
        cache: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        slot_mapping: torch.Tensor,
        *,
        layer: int = 0,
        nonfinite: NonFinite = "propagate",
    ) -> None:
        """Reference store: write K, V `[num_tokens, num_kv_heads, d]` at ``slot_mapping`` (-1 = skip).

        Non-finite vectors are stored with a NaN norm (``"propagate"``, the kernels' behaviour) and touch
        no other slot; a float16 norm past 65504 saturates there (see :meth:`encode`).
        """
        regions = self._check_cache(cache)
        nb, hkv, bs, _ = cache.shape
        if k.dim() != 3 or k.shape[1] != hkv:
            raise ValueError(f"k must be [num_tokens, {hkv}, {self.head_dim}], got {tuple(k.shape)}")
        if slot_mapping.dim() != 1 or slot_mapping.shape[0] != k.shape[0]:
            raise ValueError(
                f"slot_mapping must be [num_tokens={k.shape[0]}], got {tuple(slot_mapping.shape)}"
            )
        if slot_mapping.dtype.is_floating_point:
            raise ValueError("slot_mapping must be an integer tensor")
        sm = slot_mapping.to(torch.int64)
        if bool((sm >= nb * bs).any()) or bool((sm < -1).any()):
            raise ValueError(f"slot_mapping entries must be -1 or in 0..{nb * bs - 1}")
        keep = sm >= 0
        slots = self.encode(k[keep], v[keep], layer=layer, nonfinite=nonfinite)  # [n, hkv, slot_bytes]
        sm = sm[keep].to(cache.device)
        rmap = self._region_map(bs, cache.device)[sm % bs]  # [n, slot_bytes]
        blocks = (sm // bs)[:, None, None]
        heads = torch.arange(hkv, device=cache.device)[None, :, None]
        regions[blocks, heads, rmap[:, None, :]] = slots.to(cache.device)

    def gather_paged(
        self, cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, *, layer: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference read: decoded (K, V) float32 `[seq_len, num_kv_heads, d]` of one sequence.

        Args:
            cache: the paged cache.
            block_table: int `[max_blocks]` block ids of this sequence.
            seq_len: tokens to read.
        """
        regions = self._check_cache(cache)
        hkv, bs = cache.shape[1], cache.shape[2]
        if seq_len > block_table.shape[0] * bs:
            raise ValueError(f"seq_len {seq_len} exceeds the {block_table.shape[0]} blocks of block_table")
        pos = torch.arange(seq_len, device=cache.device)
        blocks = block_table.to(torch.int64).to(cache.device)[pos // bs][:, None, None]
        heads = torch.arange(hkv, device=cache.device)[None, :, None]
        rmap = self._region_map(bs, cache.device)[pos % bs][:, None, :]
        slots = regions[blocks, heads, rmap]  # [seq_len, num_kv_heads, slot_bytes]
        return self.decode(slots, layer=layer)


@functools.lru_cache(maxsize=256)
def _region_map(fmt: KVFormat, block_size: int, device: str) -> torch.Tensor:
    d = fmt.head_dim
    kc, vc = fmt.key.code_bytes(d), fmt.value.code_bytes(d)
    kn, vn = fmt.key.norm_bytes, fmt.value.norm_bytes
    r_kc, r_vc, r_kn, r_vn = fmt.region_offsets(block_size)
    t = torch.arange(block_size)[:, None]
    p = torch.arange(fmt.slot_bytes)[None, :]
    pad = torch.ones(fmt.slot_bytes, dtype=torch.bool)
    out = torch.zeros(block_size, fmt.slot_bytes, dtype=torch.int64)
    for start, size, region_start in (
        (0, kc, r_kc),
        (kc, vc, r_vc),
        (fmt.key_norm_offset, kn, r_kn),
        (fmt.value_norm_offset, vn, r_vn),
    ):
        sel = (p >= start) & (p < start + size)
        out = torch.where(sel, region_start + t * size + (p - start), out)
        pad[start : start + size] = False
    # bytes of a slot that hold nothing (alignment gaps, budget padding) go after the norm arrays
    npad = int(pad.sum())
    pad_rank = torch.cumsum(pad.long(), 0) - 1
    pad_base = r_vn + block_size * vn
    out = torch.where(pad[None, :], pad_base + t * npad + pad_rank[None, :], out)
    assert pad_base + block_size * npad <= block_size * fmt.slot_bytes
    return out.to(device)


@functools.lru_cache(maxsize=1024)
def _quantizers(fmt: KVFormat, layer: int) -> tuple[TurboQuantMSE, TurboQuantMSE]:
    rot = make_rotation(fmt.head_dim, fmt.rotation, layer_seed(fmt.seed, layer))
    return tuple(  # type: ignore[return-value]
        TurboQuantMSE(
            fmt.head_dim,
            c.bits,
            rotation=rot,
            hi_bits_coords=c.hi_bits_coords,
            norm_correction=c.norm_correction,
            gain_search=c.gain_search,
        )
        for c in (fmt.key, fmt.value)
    )


def _pack_codes(idx: torch.Tensor, comp: ComponentFormat, d: int) -> torch.Tensor:
    h = comp.hi_bits_coords
    if not h:
        return pack_planes(idx, comp.bits)
    return torch.cat([pack_planes(idx[..., :h], comp.bits + 1), pack_planes(idx[..., h:], comp.bits)], dim=-1)


def _unpack_codes(packed: torch.Tensor, comp: ComponentFormat, d: int) -> torch.Tensor:
    h = comp.hi_bits_coords
    if not h:
        return unpack_planes(packed.contiguous(), comp.bits, d)
    nh = planes_bytes(h, comp.bits + 1)
    return torch.cat(
        [
            unpack_planes(packed[..., :nh].contiguous(), comp.bits + 1, h),
            unpack_planes(packed[..., nh:].contiguous(), comp.bits, d - h),
        ],
        dim=-1,
    )


def _check_norm_range(gamma: torch.Tensor, comp: ComponentFormat, name: str) -> None:
    """Raise if a stored norm would not fit ``comp.norm_dtype`` (one max over the norms)."""
    limit = NORM_RANGE[comp.norm_dtype][1]
    if not gamma.numel():
        return
    top = float(gamma.amax())  # norms are >= 0; NaN cannot occur here (non-finite input raised)
    if top > limit:
        n = int((gamma > limit).sum())
        raise ValueError(
            f"{name} has {n} vector(s) whose stored norm (up to {top:.4g}) exceeds {limit:.6g}, the largest "
            f"{comp.norm_dtype} (tq_core.formats.NORM_RANGE); scale {name} down before encoding (a model's K/V "
            f"norms are normally far below this), store norms as bfloat16 or float32 "
            f"(ComponentFormat norm_dtype), or pass nonfinite='propagate' to saturate them as the kernels do"
        )


def _norm_to_bytes(gamma: torch.Tensor, comp: ComponentFormat) -> torch.Tensor:
    g = gamma.to(torch.float32)
    if comp.norm_dtype == "float16":
        fp16_max = NORM_RANGE["float16"][1]
        g = g.clamp(-fp16_max, fp16_max)  # "propagate": saturate instead of inf (NaN stays NaN)
    g = g.to(comp.torch_norm_dtype).contiguous()
    return g.view(torch.uint8).reshape(*gamma.shape, comp.norm_bytes)


def _bytes_to_norm(raw: torch.Tensor, comp: ComponentFormat) -> torch.Tensor:
    return raw.contiguous().view(comp.torch_norm_dtype).squeeze(-1).to(torch.float32)


# -- named formats ------------------------------------------------------------------------------
# The layout inside each budget, from `turboquant eval --sweep` on real activations
# (experiments/results/format_sweep.json).  Every budget is split into whole bits per coordinate for K
# and V with float16 norms.  The sweep's best layouts gave a few coordinates one extra bit
# (hi_bits_coords, e.g. K 4b+16 at 134 B), but that bought at most 1.5% lower attention error and makes
# the code width vary inside a vector, which costs the GPU kernels per-element gathers; uniform widths
# decode with contiguous loads and constant shifts.  At 196 B, K6/V6 beat K8/V4 on MiniLM and was
# within 2% of the best synthetic layout; at 118 B K4/V3 beat K3/V4 on both sets.
_NAMED_LAYOUTS: dict[str, tuple[ComponentFormat, ComponentFormat]] = {
    "turboquant_k8v4": (ComponentFormat(6), ComponentFormat(6)),
    "turboquant_4bit_nc": (ComponentFormat(4), ComponentFormat(4)),
    "turboquant_k3v4_nc": (ComponentFormat(4), ComponentFormat(3)),
    "turboquant_3bit_nc": (ComponentFormat(3), ComponentFormat(3)),
}


def format_names() -> list[str]:
    """Names accepted by :func:`named_format`."""
    return list(_NAMED_LAYOUTS)


def _fit_component(comp: ComponentFormat, d: int) -> ComponentFormat:
    hi = min(comp.hi_bits_coords * d // 128 // 8 * 8, d // 8 * 8)
    return dataclasses.replace(comp, hi_bits_coords=hi)


def named_format(
    name: str, head_dim: int = 128, *, seed: int = 0, rotation: RotationKind = "hadamard"
) -> KVFormat:
    """Our format in the byte budget of vLLM's preset ``name`` at ``head_dim``.

    The slot is padded to exactly the preset's bytes so the page (and KV capacity) matches vLLM's.

    Raises:
        ValueError: ``name`` is not one of :func:`format_names`, ``head_dim`` is not an integer >= 2,
            ``seed`` is not an integer, ``rotation`` is not ``"hadamard"``/``"haar"``, or the layout
            does not fit the budget (only possible when ``head_dim`` is not a multiple of 8).
    """
    if not isinstance(name, str) or name not in _NAMED_LAYOUTS:
        raise ValueError(f"unknown format {name!r}; known: {', '.join(_NAMED_LAYOUTS)}")
    check_head_dim(head_dim, "head_dim")
    check_int(seed, "seed")
    _check_rotation(rotation)
    return _named_format(name, head_dim, seed, rotation)


@functools.lru_cache(maxsize=256)
def _named_format(name: str, head_dim: int, seed: int, rotation: RotationKind) -> KVFormat:
    budget = budget_bytes(name, head_dim)
    key, value = (_fit_component(c, head_dim) for c in _NAMED_LAYOUTS[name])
    # Spend no more than the budget: drop extra-bit coordinates first if the scaled layout overflows.
    for _ in range(2 * head_dim):
        probe = KVFormat(head_dim, key, value, 0)
        if probe.used_bytes <= budget:
            break
        if key.hi_bits_coords >= value.hi_bits_coords and key.hi_bits_coords:
            key = dataclasses.replace(key, hi_bits_coords=key.hi_bits_coords - 8)
        elif value.hi_bits_coords:
            value = dataclasses.replace(value, hi_bits_coords=value.hi_bits_coords - 8)
        else:
            break
    if probe.used_bytes > budget:
        raise ValueError(
            f"{name} does not fit vLLM's {budget}-byte budget at head_dim {head_dim} (its code planes pad "
            f"to {probe.used_bytes} bytes); named formats fit every head_dim that is a multiple of 8, "
            f"as the kernels need: for this one build a KVFormat with fewer bits"
        )
    return KVFormat(head_dim, key, value, budget, name=name, rotation=rotation, seed=seed)

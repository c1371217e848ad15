"""tq-core: TurboQuant KV-cache compression, the pure-torch reference.

Codebooks (:mod:`tq_core.codebooks`), rotations (:mod:`tq_core.rotations`), bit packing
(:mod:`tq_core.packing`), quantizers (:mod:`tq_core.quantizers`), KV slot formats (:mod:`tq_core.formats`),
reference attention (:mod:`tq_core.attention`), metrics (:mod:`tq_core.metrics`) and the equal-bytes
baselines (:mod:`tq_core.baselines`).  Every kernel in tq-kernels is tested against these functions,
with the error measure, tolerances and test buffers of :mod:`tq_core.testing`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from tq_core import testing
from tq_core.attention import attention_ref, paged_decode_attention_ref, paged_extend_attention_ref
from tq_core.codebooks import Codebook, coordinate_density, lloyd_max_codebook, mse_lower_bound
from tq_core.formats import (
    NORM_RANGE,
    PRESET_NAMES_NOTE,
    VLLM_PRESETS,
    ComponentFormat,
    KVFormat,
    budget_bytes,
    format_names,
    named_format,
    vllm_layout,
)
from tq_core.metrics import attention_relative_error, inner_product_error, mse_distortion
from tq_core.packing import pack_bits, packed_bytes, unpack_bits
from tq_core.quantizers import (
    MSECodes,
    OutlierSplitQuantizer,
    ProdCodes,
    TurboQuantMSE,
    TurboQuantProd,
    top_rms_channels,
)
from tq_core.rotations import Rotation, fwht, layer_seed, make_rotation

try:
    __version__ = version("tq-core")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0+unknown"

__all__ = [
    "NORM_RANGE",
    "PRESET_NAMES_NOTE",
    "VLLM_PRESETS",
    "Codebook",
    "ComponentFormat",
    "KVFormat",
    "MSECodes",
    "OutlierSplitQuantizer",
    "ProdCodes",
    "Rotation",
    "TurboQuantMSE",
    "TurboQuantProd",
    "__version__",
    "attention_ref",
    "attention_relative_error",
    "budget_bytes",
    "coordinate_density",
    "format_names",
    "fwht",
    "inner_product_error",
    "layer_seed",
    "lloyd_max_codebook",
    "make_rotation",
    "mse_distortion",
    "mse_lower_bound",
    "named_format",
    "pack_bits",
    "packed_bytes",
    "paged_decode_attention_ref",
    "paged_extend_attention_ref",
    "top_rms_channels",
    "testing",
    "unpack_bits",
    "vllm_layout",
]

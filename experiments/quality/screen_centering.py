"""Screening: subtract each head's K (and V) mean before TurboQuant encoding, add it back after decoding;
or keep a sequence's first tokens (attention sinks) exact.

    python experiments/quality/screen_centering.py OUT.jsonl NUM_SEQS bf16,4bit_nc:-,4bit_nc:k,4bit_nc:kv

A key shift common to every token of a head moves every score of a query by the same amount, so softmax
ignores it; a value shift comes back as the same shift of the output.  Storing ``k - mean`` instead of
``k`` is therefore free in bytes, and helps if the per-head offset is a large part of the keys' norm.  The
mean is taken over the first chunk a layer stores (the prompt), per sequence and head.  Perplexity only,
SmolLM2 in bfloat16 on CPU, the protocol of real_quality.py (64-token chunks, a chunk's own K/V exact, every
earlier token rounded through tq_core's reference encoder); ``<preset>:-`` is the same path without the
shift, the control; ``k4v2:-`` (``k3.5v2.5:-``) splits the bits between K and V another way;
``<preset>:s`` (``:s4``) keeps the first token (4 tokens) of every sequence exact.  Output: one json row per scheme (per-sequence NLL) and a printed perplexity.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import kv_schemes
import real_models
import real_quality
import real_workload
import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from tq_core import ComponentFormat, KVFormat, named_format

CHUNK, LEN, BATCH = 64, 1024, 3


class CenteredRounder:
    """Rounds one layer's K/V through ``fmt`` after subtracting the mean of the first tokens it sees."""

    def __init__(self, fmt, layer: int, keys: bool, values: bool, sink: int = 0) -> None:
        self.fmt, self.layer, self.keys, self.values, self.sink = fmt, layer, keys, values, sink
        self.mean: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.mean is None  # the first call holds positions 0, 1, ...
        if first:
            mk = k.mean(2, keepdim=True) if self.keys else torch.zeros_like(k[:, :, :1])
            mv = v.mean(2, keepdim=True) if self.values else torch.zeros_like(v[:, :, :1])
            self.mean = (mk, mv)
        mk, mv = self.mean
        kq, vq = self.fmt.decode(self.fmt.encode(k - mk, v - mv, layer=self.layer), layer=self.layer)
        kq, vq = kq + mk, vq + mv
        if first and self.sink:  # the sequence's first tokens (attention sinks) stay exact
            kq[:, :, : self.sink], vq[:, :, : self.sink] = k[:, :, : self.sink], v[:, :, : self.sink]
        return kq, vq


def split_format(spec: str, head_dim: int) -> KVFormat:
    """``k4v2`` or ``k3.5v2.5``: a format with that many bits per coordinate for K and V (a fractional part
    gives that share of the coordinates one bit more), norm correction on, sized to its own bytes."""
    kb, vb = (float(x) for x in spec[1:].split("v"))

    def component(bits: float) -> ComponentFormat:
        whole = math.floor(bits)
        return ComponentFormat(whole, round((bits - whole) * head_dim), "float16", True)

    return KVFormat(head_dim, component(kb), component(vb), name=spec)


def cache_factory(name: str, head_dim: int):
    if name == "bf16":
        return lambda config: DynamicCache(config=config)
    preset, mode = name.split(":")
    fmt = (
        split_format(preset, head_dim)
        if preset.startswith("k") and "v" in preset and "_" not in preset
        else (named_format(f"turboquant_{preset}", head_dim))
    )

    def make(config):
        n = config.get_text_config().num_hidden_layers
        sink = int(mode.split("s")[1] or 1) if "s" in mode else 0  # "s" or "s4": first 1 or 4 tokens exact
        rounders = [CenteredRounder(fmt, i, "k" in mode, "v" in mode, sink) for i in range(n)]
        return Cache(layers=[kv_schemes.past_qdq_layer(DynamicLayer, r, 1)() for r in rounders])

    return make


def main() -> None:
    out, seqs, names = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
    torch.set_num_threads(1)  # one thread: several of these share the CPU without thrashing
    model, tok = real_models.load("smollm2")
    model = model.to(torch.bfloat16)
    model.set_attn_implementation("sdpa")
    args = type("Args", (), {"ppl_seqs": seqs, "ppl_len": LEN, "agree_prompts": 0, "agree_len": 256,
                             "needle_lengths": [], "needle_depths": [], "chunk": CHUNK})()  # fmt: skip
    work = real_workload.build_workload(tok, args)
    scored = LEN - CHUNK - 1
    for name in names:
        make, t0, nll = cache_factory(name, 64), time.time(), []
        with torch.no_grad():
            for b in range(0, seqs, BATCH):
                ids = torch.tensor(work["ppl"][b : b + BATCH])
                acc = torch.zeros(ids.shape[0], dtype=torch.float64)
                for s, logits in real_quality.prefill(model, make(model.config), ids, CHUNK, True):
                    if s:
                        tgt = ids[:, s + 1 : s + logits.shape[1] + 1]
                        lg = logits[:, : tgt.shape[1]].float().transpose(1, 2)
                        acc += F.cross_entropy(lg, tgt, reduction="none").sum(1).double()
                nll += acc.tolist()
        row = {"scheme": name, "nll_per_seq": nll, "scored": scored, "seconds": time.time() - t0}
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(name, math.exp(sum(nll) / (len(nll) * scored)), row["seconds"], flush=True)


if __name__ == "__main__":
    main()

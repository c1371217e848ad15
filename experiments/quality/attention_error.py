"""Attention-output error of KV quantizers on the reference model's real activations (CPU, minutes).

    python experiments/quality/attention_error.py [MODEL_DIR] [--seqs 4] [--len 1024] [--name attention_error_refmodel]

Why: on 2026-11-28 the quality harness (experiments/results/quality_refmodel8min.md) put vLLM's own
``turboquant_4bit_nc`` with every layer compressed at -0.05% perplexity [-0.22, +0.12] and ours at
+0.23% [+0.08, +0.40].  At the same 134 bytes the two differ mainly in the values: ours quantize them
like the keys (normalize, rotate, Lloyd-Max codes, a norm), vLLM's use plain per-token min/max
round-to-nearest with a float16 scale and zero (packages/tq-vllm/VLLM_INTERNALS.md, section a).  This
script measures, layer by layer, which choice reproduces attention better on activations of a trained
model, with everything else equal.

It runs the model (transformers, float32, CPU) on held-out text, captures every layer's post-RoPE
queries, keys and values with a pre-hook on the attention module, and for each quantizer computes the
causal GQA attention output from the round-tripped K/V against the exact one: relative error
``||O - O_hat|| / ||O||`` per layer, averaged over sequences.  Quantizers (bytes per token-head at d=128):

- ``ours``: the named format through ``KVFormat.encode``/``decode`` (the exact cache contents).
- ``ours-K + uniform-V``: our keys, values by per-token min/max RTN at our value's bit width with
  float16 scale and zero (the preset's bytes exactly: 134, 118, 102).
- ``vllm-like``: keys rotated by the plain normalized Hadamard matrix, Lloyd-Max codes, float16 norm,
  no norm correction; values per-token min/max RTN (vLLM's scheme as documented, re-implemented in
  ``tq_core.baselines.vllm_like_baseline`` from tq_core's pieces, not vLLM's code).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from tq_core import named_format
from tq_core.baselines import round_to_nearest, vllm_like_baseline
from tq_core.eval.results import write_result

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "experiments" / "results"

# the presets compared; vLLM's own split of each preset's bytes comes from tq_core.baselines.vllm_like_baseline
# (ours split the same bytes their own way: tq_core's turboquant_k3v4_nc is 4-bit keys and 3-bit values)
PRESETS = ("turboquant_4bit_nc", "turboquant_k3v4_nc", "turboquant_3bit_nc")


def capture(model, ids: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer (q [H, T, D], k [Hk, T, D], v [Hk, T, D]) after RoPE, float32."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    out = []

    def hook(module, args, kwargs):
        h = kwargs.get("hidden_states", args[0] if args else None)
        cos, sin = kwargs["position_embeddings"]
        b, t, _ = h.shape
        d = module.head_dim
        q = module.q_proj(h).view(b, t, -1, d).transpose(1, 2)
        k = module.k_proj(h).view(b, t, -1, d).transpose(1, 2)
        v = module.v_proj(h).view(b, t, -1, d).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        out.append((q[0].float(), k[0].float(), v[0].float()))

    handles = [
        layer.self_attn.register_forward_pre_hook(hook, with_kwargs=True) for layer in model.model.layers
    ]
    try:
        with torch.no_grad():
            model(ids[None])
    finally:
        for hd in handles:
            hd.remove()
    return out


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def rel_err(o: torch.Tensor, exact: torch.Tensor) -> float:
    return float((o - exact).norm() / exact.norm())


def quantizers(preset: str, layer: int):
    fmt = named_format(preset, 128)
    theirs = vllm_like_baseline(preset, 128, norm_correction=False)
    # uniform values in our value's place: b-bit codes + float16 scale and zero = our b-bit codes + 2 B
    # norm + 2 B, which every preset's slot has to spare (4bit_nc 132 of 134, 3bit_nc 100 of 102,
    # k3v4_nc 116 of 118)
    vb = fmt.value.bits

    def ours(k, v):
        # KVFormat works on [tokens, heads, d]
        kk, vv = k.transpose(0, 1), v.transpose(0, 1)
        kh, vh = fmt.decode(fmt.encode(kk, vv, layer=layer), layer=layer)
        return kh.transpose(0, 1).float(), vh.transpose(0, 1).float()

    def ours_k_uniform_v(k, v):
        kh, _ = ours(k, v)
        return kh, round_to_nearest(v, vb, -1)

    return {"ours": ours, "ours-K + uniform-V": ours_k_uniform_v, "vllm-like": theirs.quantize_dequantize}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", nargs="?", type=Path, default=ROOT / "experiments/reference-model/model")
    ap.add_argument("--seqs", type=int, default=4)
    ap.add_argument("--len", type=int, default=1024)
    ap.add_argument("--name", default="attention_error_refmodel")
    args = ap.parse_args()
    from tokenizers import Tokenizer
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(str(args.model_dir / "tokenizer.json"))
    ids = torch.tensor(tok.encode((args.model_dir / "heldout.txt").read_text()).ids)
    need = args.seqs * args.len
    if ids.numel() < need:
        raise SystemExit(f"held-out text has {ids.numel()} tokens, need {need}")
    # errors[preset][quantizer][layer] summed over sequences, plus the value-only and key-only parts
    acc: dict[str, dict[str, list[list[float]]]] = {}
    n_layers = model.config.num_hidden_layers
    for s in range(args.seqs):
        acts = capture(model, ids[s * args.len : (s + 1) * args.len])
        for layer, (q, k, v) in enumerate(acts):
            exact = attention(q, k, v)
            for preset in PRESETS:
                for name, fn in quantizers(preset, layer).items():
                    kh, vh = fn(k, v)
                    e = [rel_err(attention(q, kh, vh), exact), rel_err(attention(q, kh, v), exact),
                         rel_err(attention(q, k, vh), exact)]  # fmt: skip
                    slot = acc.setdefault(preset, {}).setdefault(
                        name, [[0.0, 0.0, 0.0] for _ in range(n_layers)]
                    )
                    slot[layer] = [a + b / args.seqs for a, b in zip(slot[layer], e, strict=True)]
        print(f"sequence {s + 1}/{args.seqs} done", flush=True)
    rows = []
    for preset, by_q in acc.items():
        for name, per_layer in by_q.items():
            mean = [sum(x[i] for x in per_layer) / n_layers for i in range(3)]
            rows.append(dict(preset=preset, quantizer=name, rel_err_mean=mean[0], keys_only=mean[1],
                             values_only=mean[2], rel_err_by_layer=[x[0] for x in per_layer]))  # fmt: skip
            print(f"{preset:20s} {name:20s} attn-out rel err {mean[0]:.4f} "
                  f"(keys only {mean[1]:.4f}, values only {mean[2]:.4f}) by layer "
                  + " ".join(f"{x[0]:.4f}" for x in per_layer), flush=True)  # fmt: skip
    write_result(args.name, {"model": str(args.model_dir.relative_to(ROOT) if args.model_dir.is_relative_to(ROOT) else args.model_dir),
                             "seqs": args.seqs, "len": args.len, "rows": rows}, results=RESULTS)  # fmt: skip


if __name__ == "__main__":
    main()

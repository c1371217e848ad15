"""Quality of KV-cache configs through transformers + tq-hf on the reference model (see README.md).

    python experiments/quality/hf_quality.py MODEL_DIR [--small] [--configs bf16,ours-4bit_nc,...]

Runs every config in this process (one model, a fresh cache per task) and prints one ``RESULT {json}``
line per config; ``--jsonl FILE`` also appends them there.  On CUDA ``TurboQuantCache`` uses the tq_kernels
store / dequantize / fused decode kernels; on CPU the tq_core reference path.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
import workload as wl
from hf_configs import Config, configs


# -- the protocol -------------------------------------------------------------------------------------
def prefill(model, cache, ids: torch.Tensor, first: int, chunk: int, keep_all: bool = False):
    """Feed `[B, T]` ids: ``first`` tokens in one forward, then chunks; returns the logits of each chunk
    after the first (all positions if ``keep_all``, else only the last)."""
    outs = []
    starts = [0, *range(first, ids.shape[1], chunk)]
    for i, s in enumerate(starts):
        e = starts[i + 1] if i + 1 < len(starts) else ids.shape[1]
        logits = model(
            input_ids=ids[:, s:e], past_key_values=cache, use_cache=True, logits_to_keep=0 if keep_all else 1
        ).logits
        outs.append((s, logits))
    return outs


def greedy(model, cache, last_logits: torch.Tensor, steps: int) -> torch.Tensor:
    tok = last_logits[:, -1].argmax(-1, keepdim=True)
    out = [tok]
    for _ in range(steps - 1):
        logits = model(input_ids=tok, past_key_values=cache, use_cache=True).logits
        tok = logits[:, -1].argmax(-1, keepdim=True)
        out.append(tok)
    return torch.cat(out, dim=1)


@torch.no_grad()
def run_config(
    model, name: str, cfg: Config, work: wl.Workload, device: torch.device, ppl_only: bool = False
) -> dict:
    from tq_hf.attention import STATS

    p = work.protocol
    model.set_attn_implementation(cfg.attn)
    stats0 = dict(STATS)
    t0 = time.perf_counter()
    # perplexity: targets at positions prefix+1 .. ppl_len-1, each predicted by a chunk forward
    ids = torch.tensor(work.ppl, device=device)
    nll_seq = torch.zeros(ids.shape[0], dtype=torch.float64, device=device)
    scored = 0
    for s, logits in prefill(model, cfg.make_cache(model), ids, p.prefix, p.chunk, keep_all=True)[1:]:
        tgt = ids[:, s + 1 : s + logits.shape[1] + 1]
        lg = logits[:, : tgt.shape[1]].float()
        loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tgt.reshape(-1), reduction="none")
        nll_seq += loss.view(tgt.shape).sum(1).double()
        scored += tgt.numel()
    nll_per_seq = nll_seq.tolist()
    nll = sum(nll_per_seq)
    # needles: all prompts of one length in one batch; greedy answer through the cache
    hits: dict[int, list[bool]] = {}
    for length in () if ppl_only else p.needle_lengths:
        group = [s for n, s in work.needles if n == length]
        x = torch.tensor([s.prompt for s in group], device=device)
        cache = cfg.make_cache(model)
        last = prefill(model, cache, x, p.chunk, p.chunk)[-1][1]
        gen = greedy(model, cache, last, max(len(s.answer) for s in group)).tolist()
        hits[length] = [wl.needle_hits(g, s) for g, s in zip(gen, group, strict=True)]
    # agreement: greedy continuations of held-out prompts
    agree: list[list[int]] = []
    cache = None
    if not ppl_only:
        x = torch.tensor(work.agree, device=device)
        cache = cfg.make_cache(model)
        last = prefill(model, cache, x, p.chunk, p.chunk)[-1][1]
        agree = greedy(model, cache, last, p.agree_steps).tolist()
    if device.type == "cuda":
        torch.cuda.synchronize()
    # evidence that the measured tokens read compressed K/V: tokens held compressed at the end, and how
    # many attention calls took the fused-kernel / dequantize paths
    layers = getattr(cache, "tq_layers", None)
    evidence = {
        "compressed_tokens_layer0": layers[0].n_comp - layers[0].start if layers else None,
        "attention_paths": {k: STATS[k] - stats0[k] for k in STATS},
    }
    return wl.summarize(
        name,
        "hf",
        nll,
        scored,
        hits,
        agree,
        nll_per_seq=nll_per_seq,
        kv=cfg.kv,
        bytes_per_token_head=cfg.bytes_per_token_head,
        note=cfg.note,
        cache=type(cache).__name__,
        attn=cfg.attn,
        seconds=round(time.perf_counter() - t0, 1),
        protocol=work.describe(),
        **evidence,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--small", action="store_true", help="CPU smoke protocol (short lengths)")
    ap.add_argument("--configs", default="", help="comma-separated subset (bf16 first is implied)")
    ap.add_argument("--residual", type=int, default=0, help="TurboQuantCache residual_length")
    ap.add_argument("--jsonl", type=Path, help="append RESULT rows here")
    ap.add_argument("--ppl-only", action="store_true", help="skip the needle and agreement tasks")
    args = ap.parse_args()
    # transformers >= 5.2x renames past_key_values to cache; 5.17 (the GPU machine) knows only the old name
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)

    from transformers import AutoModelForCausalLM

    import tq_hf  # noqa: F401  (registers the "turboquant" attention)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype).to(device).eval()
    work = wl.build(args.model_dir, wl.SMALL if args.small else wl.FULL)
    all_cfgs = configs(model.config.head_dim, args.residual)
    names = [n for n in args.configs.split(",") if n] or list(all_cfgs)
    if "bf16" not in names:
        names.insert(0, "bf16")
    print("WORKLOAD " + json.dumps(work.describe()), flush=True)
    for name in names:
        try:
            row = run_config(model, name, all_cfgs[name], work, device, args.ppl_only)
            row |= {"residual_length": args.residual, "dtype": str(dtype), "device": str(device)}
        except Exception as exc:  # one broken config must not lose the others' rows
            row = {"engine": "hf", "config": name, "error": repr(exc)[-2000:]}
        wl.emit(row, args.jsonl)


if __name__ == "__main__":
    main()

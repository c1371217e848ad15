"""Decode-time quality of KV-cache schemes on a real pretrained model, through transformers on CPU.

    python experiments/quality/real_quality.py smollm2 --jsonl experiments/results/quality_real_smollm2.jsonl
    python experiments/quality/real_report.py experiments/results/quality_real_*.jsonl

One process runs every scheme of ``kv_schemes.schemes`` (or ``--schemes a,b``) on the same token ids and
prints one ``RESULT {json}`` row per scheme, appended to ``--jsonl``; schemes already in that file are
skipped, so an interrupted run resumes.  Three tasks (README.md, "Real models"):

- perplexity by chunked teacher forcing: a ``--chunk``-token first forward, then ``--chunk``-token forwards
  that read every earlier token from the scheme's storage; every target after the first chunk is scored;
- greedy agreement: ``--agree-steps`` greedy tokens after held-out prompts prefilled in chunks;
- needles: ``tq_core.eval.needle`` prompts (a passkey and two distractor facts in held-out
  filler) prefilled in chunks, then greedy decoding; a hit is the exact answer ids.

The held-out text is Python's own documentation as shipped with the interpreter (``pydoc_data.topics``,
the text ``help()`` prints), the same on every machine with the same Python release.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import kv_schemes
import numpy as np
import real_models
import torch
import torch.nn.functional as F
from real_workload import build_workload
from workload import emit, needle_hits


def prefill(model, cache, ids: torch.Tensor, chunk: int, keep_all: bool):
    """Feed ``[B, T]`` ids in chunks; yields (start, logits) per chunk (all positions or the last)."""
    for s in range(0, ids.shape[1], chunk):
        out = model(input_ids=ids[:, s : s + chunk], past_key_values=cache, use_cache=True,
                    logits_to_keep=0 if keep_all else 1)  # fmt: skip
        yield s, out.logits


def greedy(model, cache, last: torch.Tensor, steps: int) -> list[list[int]]:
    tok = last[:, -1].argmax(-1, keepdim=True)
    out = [tok]
    for _ in range(steps - 1):
        tok = (
            model(input_ids=tok, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        )
        out.append(tok)
    return torch.cat(out, 1).tolist()


@torch.no_grad()
def run_scheme(model, scheme: kv_schemes.Scheme, work: dict, args) -> dict:
    t0 = time.perf_counter()
    nll_per_seq: list[float] = []
    for b in range(0, len(work["ppl"]), args.batch):
        ids = torch.tensor(work["ppl"][b : b + args.batch])
        nll = torch.zeros(ids.shape[0], dtype=torch.float64)
        for s, logits in prefill(model, scheme.make_cache(model.config), ids, args.chunk, keep_all=True):
            if s == 0:  # the first chunk attends to exact K/V only: not scored
                continue
            tgt = ids[:, s + 1 : s + logits.shape[1] + 1]
            lg = logits[:, : tgt.shape[1]].float()
            nll += F.cross_entropy(lg.transpose(1, 2), tgt, reduction="none").sum(1).double()
        nll_per_seq += nll.tolist()
    scored = len(work["ppl"][0]) - args.chunk - 1  # targets per sequence
    t_ppl = time.perf_counter() - t0
    x = torch.tensor(work["agree"])
    cache = scheme.make_cache(model.config)
    last = list(prefill(model, cache, x, args.chunk, keep_all=False))[-1][1]
    agree = greedy(model, cache, last, args.agree_steps)
    hits: dict[str, list[bool]] = {}
    for length in args.needle_lengths:
        group = [(s, p) for n, s, p in work["needles"] if n == length]
        cache = scheme.make_cache(model.config)
        last = list(prefill(model, cache, torch.tensor([p for _, p in group]), args.chunk, keep_all=False))[
            -1
        ][1]
        gen = greedy(model, cache, last, max(len(s.answer) for s, _ in group))
        hits[str(length)] = [needle_hits(g, s) for g, (s, _) in zip(gen, group, strict=True)]
    flat = [h for v in hits.values() for h in v]
    total = sum(nll_per_seq)
    return {
        "model": args.model, "engine": "hf", "scheme": scheme.name, "preset": scheme.preset,
        "bytes_per_token_head": scheme.bytes_per_token_head, "note": scheme.note,
        "ppl": float(np.exp(total / (scored * len(nll_per_seq)))), "nll_per_seq": nll_per_seq,
        "scored_tokens": scored, "scored_total": scored * len(nll_per_seq), "agree_tokens": agree,
        "needle_acc": sum(flat) / len(flat) if flat else None, "needle_hits": hits,
        "cache": type(cache).__name__, "seconds": round(time.perf_counter() - t0, 1), "seconds_ppl": round(t_ppl, 1),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", choices=list(real_models.MODELS))
    ap.add_argument("--cache", type=Path, default=real_models.DEFAULT_CACHE)
    ap.add_argument(
        "--schemes", default="", help="comma-separated subset of kv_schemes.schemes (baseline implied)"
    )
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--ppl-seqs", type=int, default=8)
    ap.add_argument("--ppl-len", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=4, help="sequences per perplexity forward")
    ap.add_argument("--agree-prompts", type=int, default=4)
    ap.add_argument("--agree-len", type=int, default=256)
    ap.add_argument("--agree-steps", type=int, default=256)
    ap.add_argument("--needle-lengths", type=lambda s: [int(x) for x in s.split(",") if x], default=[1024])
    ap.add_argument("--needle-depths", type=lambda s: [float(x) for x in s.split(",") if x],
                    default=[0.1, 0.3, 0.5, 0.7, 0.9])  # fmt: skip
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jsonl", type=Path, required=True)
    args = ap.parse_args()
    if args.chunk < 1 or args.ppl_len <= 2 * args.chunk or args.agree_steps < 1 or args.ppl_seqs < 2:
        raise SystemExit("need --chunk >= 1, --ppl-len > 2 * chunk, --agree-steps >= 1, --ppl-seqs >= 2")
    torch.set_num_threads(args.threads)
    # transformers >= 5.2x renames past_key_values to cache; the GPU machine's 5.17 knows only the old name
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated", category=FutureWarning)
    model, tok = real_models.load(args.model, args.cache.expanduser())
    dtype = getattr(torch, args.dtype)
    model = model.to(dtype)
    model.set_attn_implementation("sdpa")
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    table = kv_schemes.schemes(head_dim, torch.finfo(dtype).bits // 8)
    names = [n for n in args.schemes.split(",") if n] or list(table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise SystemExit(f"unknown schemes {unknown}; known: {', '.join(table)}")
    names = [next(iter(table)), *[n for n in names if n != next(iter(table))]]
    done = set()
    if args.jsonl.exists():
        rows = [json.loads(ln) for ln in args.jsonl.read_text().splitlines() if ln.strip()]
        done = {r["scheme"] for r in rows if "error" not in r}
    work = build_workload(tok, args)
    protocol = {k: v for k, v in vars(args).items() if k not in ("cache", "jsonl", "schemes")}
    protocol |= {"text": work["source"], "head_dim": head_dim, "layers": cfg.num_hidden_layers,
                 "kv_heads": cfg.num_key_value_heads, "torch": torch.__version__}  # fmt: skip
    print("PROTOCOL " + json.dumps(protocol), flush=True)
    for name in names:
        if name in done:
            print(f"{name}: already in {args.jsonl}, skipped", flush=True)
            continue
        try:
            row = run_scheme(model, table[name], work, args) | {"protocol": protocol}
        except Exception as exc:  # one broken scheme must not lose the others' rows
            row = {"model": args.model, "engine": "hf", "scheme": name, "error": repr(exc)[-2000:]}
        emit(row, args.jsonl)
        print(f"{name}: ppl {row.get('ppl')} in {row.get('seconds')} s", flush=True)


if __name__ == "__main__":
    main()

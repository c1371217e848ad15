"""Train the reference model: a small Llama (head_dim 128, GQA) on the machine's own Python sources and docs.

    python experiments/reference-model/train.py --out /tmp/ref --minutes 4 --export "$OUT"   # H200
    python experiments/reference-model/train.py --out /tmp/ref-tiny --tiny --minutes 0.3     # CPU check

Steps: collect text files (stdlib + site-packages *.py/*.md/*.rst/*.txt, sorted, deduplicated, capped),
hold out ~2% of them by path hash, train a byte-level BPE tokenizer (`tokenizers`), tokenize, then train
``LlamaForCausalLM`` for a wall-clock budget on sequences of 512..16K tokens (16K in the last third), ~80% of
them carrying the passkey task of ``tq_core.eval.needle`` with up to 6 questions each (loss = LM loss + 3x the loss
on the answer ids).  Writes a transformers model
directory (bf16 safetensors in <=15 MB shards, tokenizer.json, provenance.json, train.log, heldout.txt);
``--export DIR`` also writes the few-file form the device machine can return: the shards plus one
``ref-model-files.tar.gz`` with everything else (unpack it beside the shards).

This file holds the flags and the order of the stages; the stages are in ``trainer.py``, their pieces
(corpus, tokenizer, batches, losses, metrics) in ``training.py``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from trainer import build_model, export, final_eval, prepare_data, save, train_loop


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="model directory to write")
    ap.add_argument("--export", type=Path, help="also write shards + one tar.gz here (for $OUT)")
    ap.add_argument("--minutes", type=float, default=4.0, help="wall-clock training budget (loop only)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny corpus, model and lengths")
    ap.add_argument("--corpus-mb", type=float, default=160.0)
    ap.add_argument("--tokenizer-mb", type=float, default=30.0, help="text the BPE trainer sees")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--max-len", type=int, default=16384)
    ap.add_argument("--min-len", type=int, default=512)
    ap.add_argument("--short-until", type=float, default=0.2, help="budget share at --min-len only")
    ap.add_argument("--long-at", type=float, default=0.7, help="budget share where --max-len unlocks")
    ap.add_argument(
        "--short-share",
        type=float,
        default=0.3,
        help="after --short-until, share of steps still at --min-len (the retrieval targets keep coming)",
    )
    ap.add_argument(
        "--rewarmup",
        type=int,
        default=150,
        help="steps of lr ramp (from 25%%) after each longer length unlocks",
    )
    ap.add_argument("--tokens-per-step", type=int, default=65536)
    ap.add_argument("--needle-frac", type=float, default=0.8, help="share of rows with the passkey task")
    ap.add_argument("--distractors", type=int, default=5, help="max distractor facts in a training row")
    ap.add_argument("--questions", type=int, default=6, help="max questions (with answers) per needle row")
    ap.add_argument("--ans-weight", type=float, default=3.0, help="loss = LM + this x answer CE")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--warmup", type=int, default=100, help="warmup steps")
    ap.add_argument("--decay-at", type=float, default=0.7, help="budget share where the lr starts to decay")
    ap.add_argument("--hidden", type=int, default=384)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--eval-every", type=float, default=30.0, help="seconds between evals")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model (dynamic shapes)")
    args = ap.parse_args()
    if args.tiny:
        args.corpus_mb, args.tokenizer_mb, args.vocab = (
            min(args.corpus_mb, 4.0),
            min(args.tokenizer_mb, 2.0),
            2048,
        )
        args.max_len, args.min_len, args.tokens_per_step = min(args.max_len, 512), 256, 2048
        args.warmup, args.rewarmup = min(args.warmup, 30), min(args.rewarmup, 10)
        args.hidden, args.layers, args.heads, args.kv_heads, args.intermediate = 256, 2, 2, 1, 512
        args.eval_every = min(args.eval_every, 5.0)

    t_start = time.time()
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.out.mkdir(parents=True, exist_ok=True)

    data = prepare_data(args)  # corpus, tokenizer, token streams
    config, model, n_params, step_model, opt = build_model(args, data.tok, device)
    stats = train_loop(args, model, step_model, opt, data, rng, device)
    evaluation = final_eval(args, model, data, device)
    save(args, data, config, model, n_params, stats, evaluation, t_start, device)
    if args.export:
        export(args.out, args.export)


if __name__ == "__main__":
    main()

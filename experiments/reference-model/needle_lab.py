"""CPU learnability experiments for the passkey task: a tiny Llama, short sequences, a fixed step count.

    python experiments/reference-model/needle_lab.py --steps 1500 --rows 16 --len 256 --needle-frac 0.5

Uses the committed tokenizer (``model/tokenizer.json``) and the interpreter's own text files (the same
collection as ``train.py``, capped at ``--corpus-mb``), so a run takes minutes on 2 cores.  Prints the
training losses and the exact greedy needle accuracy (2 distractors) at the trained length and at 2x/4x it.
The recipe notes in README.md come from runs of this script.  The model, the corpus and the sampled loss
are in needle_lab_model.py.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from needle_lab_model import lab_corpus, sampled_losses, shorten_values, tiny_llama
from training import make_batch, needle_accuracy

from tq_core.eval.needle import needle_suite

HERE = Path(__file__).resolve().parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--needle-frac", type=float, default=0.5)
    ap.add_argument("--questions", type=int, default=1, help="max questions per needle row")
    ap.add_argument("--ans-weight", type=float, default=1.0)
    ap.add_argument("--distractors", type=int, default=2, help="max distractors in training rows")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--corpus-mb", type=float, default=8.0)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--lm-sample", type=float, default=0.25, help="share of positions with LM loss")
    ap.add_argument("--value-digits", type=int, default=6, help="diagnostic: shorter values (2: one id)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.value_digits != 6:
        shorten_values(args.value_digits)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(HERE / "model" / "tokenizer.json"))
    corpus, heldout = lab_corpus(tok, args.corpus_mb)
    model, opt = tiny_llama(args, tok.get_vocab_size(), tok.token_to_id("<|endoftext|>"))
    src = heldout if len(heldout) > 8 * args.len else corpus
    evals = needle_suite(tok, src, [args.len, 2 * args.len, 4 * args.len], [0.1, 0.3, 0.5, 0.7, 0.9], 4)
    print(json.dumps(vars(args)), flush=True)
    t0 = time.time()
    lm_ema = ans_ema = first_ema = rest_ema = None
    for step in range(args.steps):
        frac = step / args.steps
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        ids, amask = make_batch(
            corpus,
            tok,
            args.len,
            args.rows,
            args.needle_frac,
            rng,
            max_distractors=args.distractors,
            questions=args.questions,
        )
        lm, ans, has = sampled_losses(model, ids, amask, args.lm_sample, rng)
        loss = lm + args.ans_weight * ans if has else lm
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        lm_ema = lm.item() if lm_ema is None else 0.95 * lm_ema + 0.05 * lm.item()
        if has:
            ans_ema = ans.item() if ans_ema is None else 0.95 * ans_ema + 0.05 * ans.item()
            f, r = getattr(sampled_losses, "first", math.nan), getattr(sampled_losses, "rest", math.nan)
            first_ema = f if first_ema is None else 0.95 * first_ema + 0.05 * f
            rest_ema = r if rest_ema is None else 0.95 * rest_ema + 0.05 * r
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            model.eval()
            acc = needle_accuracy(model, evals, torch.device("cpu"))
            model.train()
            print(
                f"step {step + 1} t={time.time() - t0:.0f}s lm={lm_ema:.3f} ans={ans_ema:.3f} (first id {first_ema:.2f}, rest {rest_ema:.2f}) needle={json.dumps(acc)}",
                flush=True,
            )


if __name__ == "__main__":
    main()

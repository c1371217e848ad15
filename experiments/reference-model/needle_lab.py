"""CPU learnability experiments for the passkey task: a tiny Llama, short sequences, a fixed step count.

    python experiments/reference-model/needle_lab.py --steps 1500 --rows 16 --len 256 --needle-frac 0.5

Uses the committed tokenizer (``model/tokenizer.json``) and the interpreter's own text files (the same
collection as ``train.py``, capped at ``--corpus-mb``), so a run takes minutes on 2 cores.  Prints the
training losses and the exact greedy needle accuracy (2 distractors) at the trained length and at 2x/4x it.
The recipe notes in README.md come from runs of this script.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from training import collect_corpus, losses, make_batch, needle_accuracy, tokenize

from tq_core.eval.needle import needle_suite

HERE = Path(__file__).resolve().parent


def sampled_losses(model, ids, answer_mask, keep: float, rng):
    """``train.losses`` with the LM loss on a random ``keep`` share of positions (the vocab projection
    dominates a tiny model's CPU step); the answer positions are always scored."""
    if keep >= 1.0:
        return losses(model, ids, answer_mask)
    h = model.model(input_ids=ids).last_hidden_state[:, :-1]
    targets, m = ids[:, 1:], answer_mask[:, 1:]
    sel = torch.from_numpy(rng.random(targets.shape) < keep) | m
    ce = F.cross_entropy(model.lm_head(h[sel]).float(), targets[sel], reduction="none")
    lm = ce[~m[sel]].mean()
    ans = ce[m[sel]].sum() / m.sum().clamp(min=1)
    # the first id of each answer needs the key lookup; the rest only copying (induction)
    first = (m & ~answer_mask[:, :-1])[sel]
    sampled_losses.first = ce[first].mean().item() if first.any() else float("nan")
    sampled_losses.rest = ce[m[sel] & ~first].mean().item() if (m[sel] & ~first).any() else float("nan")
    return lm, ans, m.any().item()


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
        from tq_core.eval import needle

        lo, hi = 10 ** (args.value_digits - 1), 10**args.value_digits
        adj, nouns = needle.ADJECTIVES, needle.NOUNS

        def short_fact(rng):
            key = f"{adj[rng.integers(len(adj))]}-{nouns[rng.integers(len(nouns))]}"
            return key, str(int(rng.integers(lo, hi)))

        needle.random_fact = short_fact
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    from tokenizers import Tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = Tokenizer.from_file(str(HERE / "model" / "tokenizer.json"))
    cache = Path(f"/tmp/needle_lab_corpus_{args.corpus_mb}.npz")
    if cache.exists():
        z = np.load(cache)
        corpus, heldout = z["corpus"], z["heldout"]
    else:
        train_texts, heldout_texts, _, _ = collect_corpus(int(args.corpus_mb * 1e6), 2_000_000, 20)
        corpus, heldout = tokenize(tok, train_texts), tokenize(tok, heldout_texts)
        np.savez(cache, corpus=corpus, heldout=heldout)
    eos = tok.token_to_id("<|endoftext|>")
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden,
        intermediate_size=2 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
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

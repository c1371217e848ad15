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
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch
from training import (
    EOS,
    EXTENSIONS,
    LOG,
    CachedEncoder,
    collect_corpus,
    heldout_ppl,
    length_choices,
    log,
    losses,
    make_batch,
    needle_accuracy,
    pick_length,
    tokenize,
    train_tokenizer,
)

from tq_core.eval.needle import needle_suite


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

    # ---- data ----
    t0 = time.time()
    train_texts, heldout_texts, manifest, corpus_stats = collect_corpus(
        int(args.corpus_mb * 1e6), 2_000_000, heldout_per_mille=20
    )
    log(
        f"corpus: {json.dumps({k: v for k, v in corpus_stats.items() if k != 'roots'})} in {time.time() - t0:.1f}s"
    )
    t0 = time.time()
    tok = train_tokenizer(train_texts, args.vocab, int(args.tokenizer_mb * 1e6))
    t_tok_train = time.time() - t0
    log(f"tokenizer trained in {t_tok_train:.1f}s (vocab {tok.get_vocab_size()})")
    t0 = time.time()
    corpus = tokenize(tok, train_texts)
    heldout = tokenize(tok, heldout_texts)
    t_tokenize = time.time() - t0
    log(
        f"tokenized {len(corpus):,} train + {len(heldout):,} "
        f"held-out tokens in {t_tokenize:.1f}s ({corpus_stats['bytes_train'] / max(len(corpus), 1):.2f} bytes/token)"
    )

    # ---- model ----
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    eos_id = tok.token_to_id(EOS)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=128,
        max_position_embeddings=max(16384, args.max_len) * 2,
        rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
        tie_word_embeddings=True,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params / 1e6:.2f}M parameters, {json.dumps(config.to_diff_dict())}")
    step_model = torch.compile(model, dynamic=True) if args.compile else model
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    eval_lengths = [
        n for n in (args.max_len // 8, args.max_len // 4, args.max_len // 2, args.max_len) if n >= 256
    ]
    quick_eval = needle_suite(
        tok,
        heldout if len(heldout) > args.max_len else corpus,
        eval_lengths,
        [0.1, 0.5, 0.9],
        2,
        base_seed=99,
    )

    # ---- train ----
    budget = args.minutes * 60
    warmup = args.warmup
    step = tokens_seen = 0
    lm_ema = ans_ema = None
    longest, unlocked_at = args.min_len, 0
    enc = CachedEncoder(tok)
    t_train = time.time()
    last_eval = t_train
    model.train()
    while True:
        frac = (time.time() - t_train) / budget
        if frac >= 1.0:
            break
        lengths = length_choices(frac, args.max_len, args.min_len, args.short_until, args.long_at)
        if lengths[-1] != longest:  # a longer length just unlocked: ramp the lr up again
            longest, unlocked_at = lengths[-1], step
        length = pick_length(lengths, args.short_share, rng)
        rows = max(1, args.tokens_per_step // length)
        ids, amask = make_batch(
            corpus, enc, length, rows, args.needle_frac, rng, args.distractors, args.questions
        )
        has_ans = bool(amask.any())  # on the host: the loop syncs with the GPU only at evals
        ids, amask = ids.to(device, non_blocking=True), amask.to(device, non_blocking=True)
        # warmup, constant until decay_at (the curriculum's long lengths train at full lr), cosine to 10%
        decay = min(1.0, max(0.0, (frac - args.decay_at) / max(1.0 - args.decay_at, 1e-9)))
        ramp = min(1.0, (step + 1) / warmup)
        if unlocked_at:
            ramp *= min(1.0, 0.25 + 0.75 * (step - unlocked_at) / max(args.rewarmup, 1))
        lr = args.lr * ramp * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * decay)))
        for g in opt.param_groups:
            g["lr"] = lr
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            lm, ans, _ = losses(step_model, ids, amask)
        loss = lm + args.ans_weight * ans  # ans is 0 without answer ids
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        tokens_seen += ids.numel()
        lm_ema = lm.detach() if lm_ema is None else 0.95 * lm_ema + 0.05 * lm.detach()
        if has_ans:
            ans_ema = ans.detach() if ans_ema is None else 0.9 * ans_ema + 0.1 * ans.detach()
        if time.time() - last_eval >= args.eval_every:
            last_eval = time.time()
            lm_ema, ans_ema = float(lm_ema), None if ans_ema is None else float(ans_ema)
            model.eval()
            acc = needle_accuracy(model, quick_eval, device)
            model.train()
            el = time.time() - t_train
            log(
                f"step {step} t={el:.0f}s len={length} lr={lr:.2e} lm={lm_ema:.3f} ans={ans_ema or 0:.3f} "
                f"tok/s={tokens_seen / el:,.0f} needle={json.dumps(acc)}"
            )
    train_seconds = time.time() - t_train
    lm_ema, ans_ema = float(lm_ema), None if ans_ema is None else float(ans_ema)
    log(
        f"trained {step} steps, {tokens_seen:,} tokens in {train_seconds:.0f}s ({tokens_seen / train_seconds:,.0f} tok/s)"
    )

    # ---- final evaluation ----
    model.eval()
    ppl_len = min(2048, args.max_len)
    ppl = heldout_ppl(model, heldout, ppl_len, 32, device)
    final_lengths = [2048, 4096, 8192, 16384] if not args.tiny else [128, 256, 512]
    suite = needle_suite(
        tok,
        heldout if len(heldout) > max(final_lengths) else corpus,
        final_lengths,
        [0.1, 0.3, 0.5, 0.7, 0.9],
        4,
    )
    acc = needle_accuracy(model, suite, device)
    log(
        f"held-out ppl@{ppl_len}={ppl:.3f}; needle accuracy (5 depths x 4 seeds, 2 distractors) {json.dumps(acc)}"
    )

    # ---- write ----
    model.to(torch.bfloat16).save_pretrained(args.out, max_shard_size="15MB")
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        pad_token=EOS,
        model_max_length=config.max_position_embeddings,
    )
    hf_tok.save_pretrained(args.out)
    # held-out text for the quality harness's perplexity (the first ~1 MB of held-out files, in split order)
    held_text, n = [], 0
    for t in heldout_texts:
        held_text.append(t)
        n += len(t)
        if n > 1_000_000:
            break
    (args.out / "heldout.txt").write_text(EOS.join(held_text))
    import tokenizers
    import transformers

    provenance = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seed": args.seed,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "data": {
            **corpus_stats,
            "tokens_train": len(corpus),
            "tokens_heldout": len(heldout),
            "extensions": EXTENSIONS,
            "selection": "files named <root label>/<relative path>; visited in sha1(name) order, deduplicated "
            "by content sha1, files over 2 MB skipped, stop at corpus-mb; held out where "
            "sha1('split:'+name) % 1000 < 20",
            "heldout_files": manifest["heldout"],
            "train_files_count": len(manifest["train"]),
            "train_files_sha1_of_sorted_list": hashlib.sha1(
                "\n".join(sorted(manifest["train"])).encode()
            ).hexdigest(),
            "heldout_txt": "heldout.txt: the first ~1 MB of held-out files joined by <|endoftext|>",
        },
        "tokenizer": {
            "type": "byte-level BPE (tokenizers)",
            "vocab_size": tok.get_vocab_size(),
            "trained_on_bytes": int(args.tokenizer_mb * 1e6),
            "train_seconds": round(t_tok_train, 1),
            "tokenize_seconds": round(t_tokenize, 1),
        },
        "architecture": {"class": "LlamaForCausalLM", "parameters": n_params, **config.to_diff_dict()},
        "training": {
            "steps": step,
            "tokens_seen": tokens_seen,
            "train_seconds": round(train_seconds, 1),
            "tokens_per_second": round(tokens_seen / max(train_seconds, 1e-9)),
            "final_train_lm_loss_ema": lm_ema,
            "final_answer_loss_ema": ans_ema,
            "optimizer": f"AdamW lr {args.lr} betas (0.9, 0.95) wd 0.1, {warmup}-step warmup, a {args.rewarmup}-step "
            f"re-warmup from 25% whenever a longer length unlocks, constant to {args.decay_at:.0%} of the wall-clock budget, then cosine to 10%, grad clip 1.0, bf16 autocast, "
            "SDPA attention",
            "lengths": f"curriculum {args.min_len}..{args.max_len} ({args.min_len} only until {args.short_until:.0%} "
            f"of budget, then doubling, longest unlocked at {args.long_at:.0%}; after that {args.short_share:.0%} of "
            f"the steps at {args.min_len}, 40% of the rest at the longest allowed, the others uniform); {args.tokens_per_step} tokens/step; needle rows {args.needle_frac:.0%} (0-{args.distractors} "
            f"distractors, up to {args.questions} questions each followed by its answer; "
            f"loss = LM + {args.ans_weight} x mean CE on answer ids)",
        },
        "eval": {
            "heldout_ppl": None if math.isnan(ppl) else ppl,
            "heldout_ppl_seq_len": ppl_len,
            "heldout_ppl_seqs": min(32, len(heldout) // ppl_len),
            "needle_accuracy_bf16": {str(k): v for k, v in acc.items()},
            "needle_protocol": "5 depths (0.1..0.9) x 4 seeds per length, 2 distractor facts, exact greedy "
            "answer (teacher-forced argmax)",
        },
        "wall_seconds_total": round(time.time() - t_start, 1),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
    }
    (args.out / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
    log(f"wrote {args.out} in {time.time() - t_start:.0f}s total")
    (args.out / "train.log").write_text("\n".join(LOG) + "\n")
    if args.export:
        export(args.out, args.export)


def export(model_dir: Path, dest: Path) -> None:
    """Shards as they are, everything else in one tar.gz: few files, each small (the $OUT limits)."""
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(dest / "ref-model-files.tar.gz", "w:gz") as tar:
        for f in sorted(model_dir.iterdir()):
            if f.suffix == ".safetensors":
                shutil.copy2(f, dest / f.name)
            else:
                tar.add(f, arcname=f.name)
    for f in sorted(dest.iterdir()):
        print(f"export: {f.name} {f.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()

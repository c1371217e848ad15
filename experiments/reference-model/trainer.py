"""``train.py``'s stages: the data, the model and optimizer, the training loop, the final evaluation, the
model directory (weights, tokenizer, held-out text, provenance, log) and the ``--export`` form.

Each stage takes the parsed ``train.py`` arguments; ``train.py`` seeds torch and one numpy generator and
calls the stages in this order.  The smaller pieces (corpus, tokenizer, batches, losses, metrics) are in
``training.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


@dataclass
class Data:
    """The tokenizer, the tokenized train/held-out streams and what provenance.json records about them."""

    tok: Any
    corpus: np.ndarray
    heldout: np.ndarray
    heldout_texts: list[str]
    manifest: dict
    corpus_stats: dict
    t_tok_train: float
    t_tokenize: float


@dataclass
class TrainStats:
    """What the training loop reports: steps, tokens, seconds and the final loss EMAs."""

    steps: int
    tokens_seen: int
    seconds: float
    lm_ema: float
    ans_ema: float | None


def prepare_data(args) -> Data:
    """Collect the corpus (held-out split by path hash), train the BPE tokenizer, tokenize both parts."""
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
    return Data(tok, corpus, heldout, heldout_texts, manifest, corpus_stats, t_tok_train, t_tokenize)


def build_model(args, tok, device: torch.device):
    """The ``LlamaForCausalLM`` (head_dim 128), its step callable (compiled with ``--compile``) and AdamW.

    Returns ``(config, model, n_params, step_model, opt)``.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

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
    return config, model, n_params, step_model, opt


def train_loop(args, model, step_model, opt, data: Data, rng, device: torch.device) -> TrainStats:
    """Train for the wall-clock budget (length curriculum, lr schedule), with a quick needle eval and a
    log line every ``--eval-every`` seconds."""
    tok, corpus, heldout = data.tok, data.corpus, data.heldout
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
    return TrainStats(step, tokens_seen, train_seconds, lm_ema, ans_ema)


def final_eval(args, model, data: Data, device: torch.device) -> tuple[float, int, dict]:
    """Held-out perplexity and the needle accuracy (5 depths x 4 seeds per length); returns
    ``(ppl, ppl_len, acc)``."""
    tok, corpus, heldout = data.tok, data.corpus, data.heldout
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
    return ppl, ppl_len, acc


def save(
    args,
    data: Data,
    config,
    model,
    n_params: int,
    stats: TrainStats,
    evaluation: tuple[float, int, dict],
    t_start: float,
    device: torch.device,
) -> None:
    """Write the model directory: bf16 shards, the tokenizer, heldout.txt, provenance.json, train.log."""
    from transformers import PreTrainedTokenizerFast

    tok, corpus, heldout, corpus_stats, manifest = (
        data.tok,
        data.corpus,
        data.heldout,
        data.corpus_stats,
        data.manifest,
    )
    ppl, ppl_len, acc = evaluation
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
    for t in data.heldout_texts:
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
            "train_seconds": round(data.t_tok_train, 1),
            "tokenize_seconds": round(data.t_tokenize, 1),
        },
        "architecture": {"class": "LlamaForCausalLM", "parameters": n_params, **config.to_diff_dict()},
        "training": {
            "steps": stats.steps,
            "tokens_seen": stats.tokens_seen,
            "train_seconds": round(stats.seconds, 1),
            "tokens_per_second": round(stats.tokens_seen / max(stats.seconds, 1e-9)),
            "final_train_lm_loss_ema": stats.lm_ema,
            "final_answer_loss_ema": stats.ans_ema,
            "optimizer": f"AdamW lr {args.lr} betas (0.9, 0.95) wd 0.1, {args.warmup}-step warmup, a {args.rewarmup}-step "
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

"""needle_lab.py's pieces: the tiny Llama and its optimizer, the cached corpus, the LM loss on sampled
positions, and the diagnostic of shorter needle values (moved as they were from needle_lab.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from training import collect_corpus, losses, tokenize


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


def shorten_values(digits: int) -> None:
    """Diagnostic: the needle task's values get ``digits`` digits (2: one token id) instead of 6."""
    from tq_core.eval import needle

    lo, hi = 10 ** (digits - 1), 10**digits
    adj, nouns = needle.ADJECTIVES, needle.NOUNS

    def short_fact(rng):
        key = f"{adj[rng.integers(len(adj))]}-{nouns[rng.integers(len(nouns))]}"
        return key, str(int(rng.integers(lo, hi)))

    needle.random_fact = short_fact


def lab_corpus(tok, corpus_mb: float) -> tuple[np.ndarray, np.ndarray]:
    """Training and held-out token ids of ``corpus_mb`` MB of the interpreter's text files, cached in /tmp."""
    cache = Path(f"/tmp/needle_lab_corpus_{corpus_mb}.npz")
    if cache.exists():
        z = np.load(cache)
        return z["corpus"], z["heldout"]
    train_texts, heldout_texts, _, _ = collect_corpus(int(corpus_mb * 1e6), 2_000_000, 20)
    corpus, heldout = tokenize(tok, train_texts), tokenize(tok, heldout_texts)
    np.savez(cache, corpus=corpus, heldout=heldout)
    return corpus, heldout


def tiny_llama(args: argparse.Namespace, vocab_size: int, eos: int):
    """The Llama of ``args``' sizes and its AdamW (weight decay on matrices only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab_size,
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
    return model, opt

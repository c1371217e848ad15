"""The token ids of real_quality.py's protocol: held-out text (Python's own documentation, ``pydoc_data``),
perplexity sequences, greedy-agreement prompts and needle prompts, the same for every scheme."""

from __future__ import annotations

import hashlib
import sys

import numpy as np

from tq_core.eval.needle import needle_suite


def heldout_text() -> tuple[str, str]:
    """(text, description): the pydoc topics in sorted order."""
    import pydoc_data.topics as topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    return (
        text,
        f"pydoc_data.topics of Python {sys.version.split()[0]} ({len(text)} chars, sha256 {digest}...)",
    )


class Encoder:
    """``encode(text) -> ids`` without special tokens, what tq_core.eval.needle expects."""

    def __init__(self, tok) -> None:
        self.tok = tok

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False).input_ids


def build_workload(tok, args) -> dict:
    text, source = heldout_text()
    ids = np.asarray(Encoder(tok).encode(text), dtype=np.int64)
    bos = [tok.bos_token_id] if tok("a").input_ids[0] == tok.bos_token_id else []  # e.g. Gemma's <bos>
    body = args.ppl_len - len(bos)
    need = args.ppl_seqs * body + args.agree_prompts * args.agree_len + max(args.needle_lengths, default=0)
    if len(ids) < need:
        raise SystemExit(f"held-out text has {len(ids)} tokens, the protocol needs {need}: ask for less")
    ppl = [bos + ids[i * body : (i + 1) * body].tolist() for i in range(args.ppl_seqs)]
    at = args.ppl_seqs * body
    agree = [bos + ids[at + i * args.agree_len : at + (i + 1) * args.agree_len - len(bos)].tolist()
             for i in range(args.agree_prompts)]  # fmt: skip
    filler = ids[at + args.agree_prompts * args.agree_len :]
    needles = needle_suite(Encoder(tok), filler, list(args.needle_lengths), list(args.needle_depths), 1)
    needles = [(n, s, bos + s.prompt[len(bos) :]) for n, s in needles]
    return {"ppl": ppl, "agree": agree, "needles": needles, "source": source, "heldout_tokens": len(ids)}

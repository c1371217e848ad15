"""The quality protocol, the same token ids for every engine and config (see README.md).

Held-out ids come from the model directory's ``heldout.txt`` (files the model never trained on), tokenized
with its ``tokenizer.json``; the needle prompts come from ``tq_core.eval.needle``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tq_core.eval.needle import NeedleSample, needle_suite


@dataclass(frozen=True)
class Protocol:
    ppl_seqs: int = 16  # held-out sequences for perplexity
    ppl_len: int = 2048
    prefix: int = 256  # first forward: exact attention among these tokens; not scored
    chunk: int = 256  # later tokens go in chunks of this size, reading the compressed cache
    needle_lengths: tuple[int, ...] = (2048, 4096, 8192, 16384)
    needle_depths: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9)
    needle_seeds: int = 2
    distractors: int = 2
    agree_prompts: int = 4
    agree_prompt_len: int = 512
    agree_steps: int = 256


FULL = Protocol()
# CPU smoke test with a tiny model: same code paths, short lengths
SMALL = Protocol(
    ppl_seqs=2,
    ppl_len=256,
    prefix=64,
    chunk=64,
    needle_lengths=(256, 512),
    needle_depths=(0.1, 0.5, 0.9),
    needle_seeds=1,
    agree_prompts=2,
    agree_prompt_len=96,
    agree_steps=32,
)


@dataclass
class Workload:
    protocol: Protocol
    ppl: list[list[int]]  # ppl_seqs x ppl_len
    needles: list[tuple[int, NeedleSample]]  # (length, sample)
    agree: list[list[int]]  # agree_prompts x agree_prompt_len
    heldout_tokens: int
    tiled: bool  # held-out text was too short and was repeated (tiny CPU tests only)

    def describe(self) -> dict:
        return {**asdict(self.protocol), "heldout_tokens": self.heldout_tokens, "tiled": self.tiled}


def load_tokenizer(model_dir: Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(model_dir / "tokenizer.json"))


def build(model_dir: Path, protocol: Protocol = FULL) -> Workload:
    """The protocol's token ids for the model in ``model_dir`` (deterministic)."""
    tok = load_tokenizer(model_dir)
    ids = np.asarray(tok.encode((model_dir / "heldout.txt").read_text()).ids, dtype=np.int64)
    p = protocol
    need = p.ppl_seqs * p.ppl_len + p.agree_prompts * p.agree_prompt_len + max(p.needle_lengths) + 1
    tiled = len(ids) < need
    if tiled:
        ids = np.resize(ids, need)
    ppl = [ids[i * p.ppl_len : (i + 1) * p.ppl_len].tolist() for i in range(p.ppl_seqs)]
    base = p.ppl_seqs * p.ppl_len
    agree = [
        ids[base + i * p.agree_prompt_len : base + (i + 1) * p.agree_prompt_len].tolist()
        for i in range(p.agree_prompts)
    ]
    needles = needle_suite(
        tok, ids, list(p.needle_lengths), list(p.needle_depths), p.needle_seeds, distractors=p.distractors
    )
    return Workload(p, ppl, needles, agree, len(ids), tiled)


def needle_hits(generated: list[int], sample: NeedleSample) -> bool:
    """Exact match of the greedy continuation's first ids with the answer ids."""
    return list(generated[: len(sample.answer)]) == list(sample.answer)


def summarize(
    name: str, engine: str, nll: float, scored: int, hits: dict[int, list[bool]], agree_tokens, **extra
):
    """One RESULT row (agreement with bf16 is computed by report.py, against the same engine's bf16 row)."""
    acc = {str(k): sum(v) / len(v) for k, v in sorted(hits.items())}
    flat = [h for v in hits.values() for h in v]
    return {
        "engine": engine,
        "config": name,
        "ppl": float(np.exp(nll / scored)),
        "nll_sum": nll,
        "scored_tokens": scored,
        "needle_acc": sum(flat) / len(flat) if flat else None,  # None: needles not run
        "needle_acc_by_length": acc,
        "needle_hits": {str(k): v for k, v in sorted(hits.items())},
        "agree_tokens": agree_tokens,
        **extra,
    }


def emit(row: dict, jsonl: Path | None) -> None:
    """Print one ``RESULT {json}`` line (what report.py and the device logs read) and append the row to
    ``jsonl`` when given."""
    line = json.dumps(row)
    print("RESULT " + line, flush=True)
    if jsonl:
        with jsonl.open("a") as f:
            f.write(line + "\n")

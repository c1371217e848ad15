"""A synthetic long-context retrieval task (passkeys in filler text), for training and quality runs.

The reference model's training script (experiments/reference-model/train.py) and the quality harness
(experiments/quality) build their needle prompts here, so both use the same task.

A sample is filler text (real corpus tokens) with a few facts planted in it, each

    "\\nThe passkey of <key> is <value>.\\n"          e.g. "The passkey of amber-falcon is 482913."

and, at the very end, a question about one of them, whose answer is the value:

    "\\nWhat is the passkey of <key>? The passkey of <key> is" -> " <value>."

Everything is built from token ids, segment by segment, so the answer's ids are the same in the planted
fact and in the expected answer whatever the tokenizer merges across segment boundaries; the harness
feeds the prompt ids to both engines and compares the greedy ids with :attr:`NeedleSample.answer`
exactly.  The other facts (distractors) use different keys, so retrieval needs the key to match: a model
that only copies "the last passkey" fails.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

__all__ = [
    "Encoder",
    "NeedleSample",
    "answer_ids",
    "build_needle",
    "needle_suite",
    "question_ids",
    "random_fact",
]

ADJECTIVES = [
    "amber",
    "azure",
    "bold",
    "brisk",
    "calm",
    "cedar",
    "coral",
    "crisp",
    "dusty",
    "eager",
    "fading",
    "gentle",
    "golden",
    "hollow",
    "icy",
    "jade",
    "keen",
    "lunar",
    "misty",
    "noble",
    "olive",
    "pale",
    "quiet",
    "rapid",
    "rusty",
    "silent",
    "silver",
    "solar",
    "sturdy",
    "tawny",
    "velvet",
    "wild",
]
NOUNS = [
    "anchor",
    "badger",
    "beacon",
    "canyon",
    "comet",
    "crane",
    "delta",
    "ember",
    "falcon",
    "fern",
    "glacier",
    "harbor",
    "heron",
    "island",
    "jaguar",
    "kettle",
    "lantern",
    "maple",
    "meadow",
    "nebula",
    "orchid",
    "otter",
    "pebble",
    "quartz",
    "raven",
    "river",
    "saddle",
    "summit",
    "thistle",
    "tundra",
    "walrus",
    "willow",
]


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class NeedleSample:
    """One retrieval prompt: ``prompt`` ids (ending with the question) and the expected ``answer`` ids."""

    prompt: list[int]
    answer: list[int]
    depth: float  # where the asked-for fact sits, as a fraction of the filler
    key: str
    value: str
    facts: tuple[tuple[str, str], ...] = ()  # every planted (key, value), the asked-for one first


def question_ids(tok: Encoder, key: str) -> list[int]:
    """The question about ``key``; the prompt ends with it, and the answer ids follow."""
    return _encode(tok, f"\nWhat is the passkey of {key}? The passkey of {key} is")


def answer_ids(tok: Encoder, value: str) -> list[int]:
    """The expected answer, the same ids as the value's in the planted fact, then ``.``."""
    return _encode(tok, f" {value}") + _encode(tok, ".")


def _encode(tok: Encoder, text: str) -> list[int]:
    # `tokenizers.Tokenizer.encode` returns an Encoding; transformers' tokenizers return a list
    out = tok.encode(text)
    return list(out.ids) if hasattr(out, "ids") else list(out)


def random_fact(rng: np.random.Generator) -> tuple[str, str]:
    """A ``(key, value)`` pair: an adjective-noun key and a six-digit value."""
    key = f"{ADJECTIVES[rng.integers(len(ADJECTIVES))]}-{NOUNS[rng.integers(len(NOUNS))]}"
    return key, str(int(rng.integers(100_000, 1_000_000)))


def build_needle(
    tok: Encoder,
    filler: np.ndarray,
    length: int,
    depth: float,
    rng: np.random.Generator,
    *,
    distractors: int = 2,
) -> NeedleSample:
    """A prompt of exactly ``length`` ids: ``filler`` with the asked-for fact at ``depth`` (0..1).

    Args:
        tok: anything with ``encode(text)`` (a ``tokenizers.Tokenizer`` or a transformers tokenizer).
        filler: `(n,)` corpus token ids, ``n >= length``; its first ids are used.
        length: total prompt length in ids (filler + facts + question).
        depth: position of the asked-for fact within the filler, as a fraction.
        rng: source of keys, values and the distractors' depths.
        distractors: facts with other keys planted at random depths.

    Example:
        >>> class Chars:  # any tokenizer with encode(text) -> ids
        ...     def encode(self, text):
        ...         return [ord(c) for c in text]
        >>> corpus = np.arange(4096) % 50 + 1000
        >>> sample = build_needle(Chars(), corpus, 4096, 0.5, np.random.default_rng(0))
        >>> len(sample.prompt)
        4096
    """
    keys: list[str] = []
    facts: list[tuple[str, str]] = []
    while len(facts) < 1 + distractors:
        key, value = random_fact(rng)
        if key not in keys:
            keys.append(key)
            facts.append((key, value))
    key, value = facts[0]
    answer = answer_ids(tok, value)
    fact_ids = [
        _encode(tok, f"\nThe passkey of {k} is") + _encode(tok, f" {v}") + _encode(tok, ".\n")
        for k, v in facts
    ]
    question = question_ids(tok, key)
    n_filler = length - len(question) - sum(len(f) for f in fact_ids)
    if n_filler < 0 or len(filler) < n_filler:
        raise ValueError(
            f"length {length} is too short for the facts, or filler has fewer than {n_filler} ids"
        )
    depths = [depth] + [float(rng.uniform(0.0, 1.0)) for _ in range(distractors)]
    cuts = sorted((round(d * n_filler), i) for i, d in enumerate(depths))
    body: list[int] = []
    start = 0
    for cut, i in cuts:
        body += filler[start:cut].tolist() + fact_ids[i]
        start = cut
    body += filler[start:n_filler].tolist()
    return NeedleSample(
        prompt=body + question, answer=answer, depth=depth, key=key, value=value, facts=tuple(facts)
    )


def needle_suite(
    tok: Encoder,
    corpus: np.ndarray,
    lengths: list[int],
    depths: list[float],
    seeds: int,
    *,
    distractors: int = 2,
    base_seed: int = 1234,
) -> list[tuple[int, NeedleSample]]:
    """``(length, sample)`` for every length x depth x seed, filler drawn from ``corpus`` deterministically."""
    out = []
    for length in lengths:
        for di, depth in enumerate(depths):
            for s in range(seeds):
                rng = np.random.default_rng([base_seed, length, di, s])
                start = int(rng.integers(0, max(1, len(corpus) - length)))
                filler = corpus[start : start + length]
                out.append((length, build_needle(tok, filler, length, depth, rng, distractors=distractors)))
    return out

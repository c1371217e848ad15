"""Compile the decode, store or extend kernel for a GPU target without a GPU and report what limits it
on paper.

    python packages/tq-kernels/benchmarks/aot_report.py [--kernel decode|store|extend]
        [--formats turboquant_4bit_nc,...] [--configs 128x4,64x4] [--arch 90] [--ablate 0] [--dump DIR]

Triton lowers the kernel to TTGIR and PTX on the CPU and its bundled ``ptxas`` assembles it for
``sm_<arch>``; ``ptxas -v`` then prints registers per thread and spills.  Per format and launch config
(BLOCK_N x num_warps, ``n`` for the NIBBLE loop, ``ny`` with the symmetric lookup) this prints: registers, spill bytes, shared memory, the resident programs per SM
that the registers allow, and how many layout conversions and shared-memory staging buffers the TTGIR
holds.  It runs in seconds on the development machine and needs no device time, so a kernel change
can be screened for register blow-ups before it is timed on the GPU (``bench_tune.py`` beside it).
It lives with the benchmarks because it compiles the private ``@triton.jit`` bodies (``tq_kernels._kernels``)
with the constexprs the launchers would pass; run it with the packages installed (or on ``PYTHONPATH``) and
without ``TRITON_INTERPRET`` (the interpreter replaces the kernels by Python functions).

Shapes are the benchmark's: Llama-8B heads (GQA group 4 padded to 16 rows), head_dim 128, page 16,
2 context splits.  For ``--kernel store`` a config is rows (token-heads) per program x num_warps; the
launcher uses 16x4 for small stores and 64x4 for large ones (tq_kernels.tuning.store_config).
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from tq_core import named_format
from tq_core.quantizers import GAIN_GRID
from tq_kernels._format import kernel_format
from tq_kernels._kernels.decode import _tq_decode_attention_kernel
from tq_kernels._kernels.extend import _tq_extend_attention_kernel
from tq_kernels._kernels.store import _tq_store_kernel
from tq_kernels.ops._slot_checks import field_constexprs

ARGS = [("q_ptr", "*fp32"), ("cache_ptr", "*u8"), ("block_table_ptr", "*i32"), ("seq_lens_ptr", "*i32"),
        ("k_lut_ptr", "*fp16"), ("v_lut_ptr", "*fp16"), ("part_o_ptr", "*fp32"), ("part_ml_ptr", "*fp32"),
        *((n, "i64") for n in ("stride_q_b", "stride_q_h", "stride_cache_blk", "stride_cache_head",
                               "stride_bt_b", "stride_po_b", "stride_po_h", "stride_po_s")),
        ("softcap", "fp32"), ("sliding_window", "i32")]  # fmt: skip
REGISTERS_PER_SM = 65536


def compile_decode(
    name: str, block_n: int, warps: int, arch: int, ablate: int, dump: Path | None,
    nibble: bool = False, lut: str = "exact", chunks: int = 1,
) -> dict:  # fmt: skip
    kf = kernel_format(named_format(name, 128))
    nibble = nibble and all(c.bits in (3, 4) for c in (kf.key, kf.value))
    pairs = nibble and lut == "byte"
    k_asm, v_asm = kf.nibble_asm(symmetric=lut == "sym") if nibble and not pairs else ("", "")
    scales = {"K_SCALE": 1.0, "V_SCALE": 1.0}
    if pairs:
        kb, vb = kf.byte_lookup("cpu")
        k_asm, v_asm, scales = kb.asm, vb.asm, dict(K_SCALE=kb.scale, V_SCALE=vb.scale)
    page = 16
    constexprs = dict(NUM_HEADS=32, NUM_SPLITS=2, GROUP=4, BLOCK_G=16, BLOCK_N=block_n, USE_SOFTCAP=False,
                      USE_WINDOW=False, NIBBLE=nibble, BLOCK_W=16, K_ASM=k_asm,
                      V_ASM=v_asm, GROUP_P2=4, CHUNKS=chunks if nibble else 1, PAIRS=pairs, **scales,
                      SCORE_CHAINS=int(os.environ.get("AOT_CHAINS", "1")),
                      **kf.region_constexprs(page))  # fmt: skip
    kernel = _tq_decode_attention_kernel
    if ablate:  # the plane loop with stages left out (ablated_decode.py)
        if nibble:
            raise SystemExit("--ablate applies to the plane loop: pick configs without n")
        from ablated_decode import _tq_decode_ablated_kernel

        kernel, constexprs = _tq_decode_ablated_kernel, constexprs | {"ABLATE": ablate}
    signature = {n: t for n, t in ARGS} | dict.fromkeys(constexprs, "constexpr")
    # pointers and strides 16-byte aligned/divisible, as Triton specializes them at a real launch
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(16)}
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    stem = f"decode_{name}_{block_n}x{warps}{'n' if nibble else ''}{'y' if nibble and lut == 'sym' else ''}{'b' if pairs else ''}{f'c{chunks}' if chunks > 1 else ''}_a{ablate}"
    return dict(format=name, block_n=block_n, warps=warps, nibble=nibble, ablate=ablate,
                **_measure(src, arch, warps, dump, stem))  # fmt: skip


EXTEND_ARGS = [("q_ptr", "*fp32"), ("k_ptr", "*fp16"), ("v_ptr", "*fp16"), ("cache_ptr", "*u8"),
               ("block_table_ptr", "*i32"), ("prefix_lens_ptr", "*i32"), ("qsl_ptr", "*i32"),
               ("k_lut_ptr", "*fp16"), ("v_lut_ptr", "*fp16"), ("sinks_ptr", "*fp32"), ("out_ptr", "*fp32"),
               *((n, "i64") for n in ("stride_q_t", "stride_q_h", "stride_k_t", "stride_k_h", "stride_cache_blk",
                                      "stride_cache_head", "stride_bt_b", "stride_o_t", "stride_o_h")),
               ("softcap", "fp32"), ("sliding_window", "i32")]  # fmt: skip


def compile_extend(
    name: str,
    block_n: int,
    warps: int,
    arch: int,
    dump: Path | None,
    nibble: bool = False,
    lut: str = "exact",
) -> dict:
    """The extend kernel at the benchmark's shape (GQA group 4, 64 query rows a program, page 16)."""
    kf = kernel_format(named_format(name, 128))
    nibble = nibble and all(c.bits in (3, 4) for c in (kf.key, kf.value))
    k_asm, v_asm = kf.nibble_asm(symmetric=lut == "sym") if nibble else ("", "")
    constexprs = dict(GROUP=4, GROUP_P2=4, BLOCK_R=64, M_TOK=16, BLOCK_N=block_n, USE_SOFTCAP=False,
                      USE_WINDOW=False, USE_SINKS=False, NIBBLE=nibble, BLOCK_W=16, K_ASM=k_asm, V_ASM=v_asm,
                      **kf.region_constexprs(16))  # fmt: skip
    signature = {n: t for n, t in EXTEND_ARGS} | dict.fromkeys(constexprs, "constexpr")
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(EXTEND_ARGS) - 2)}
    src = ASTSource(fn=_tq_extend_attention_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    stem = f"extend_{name}_{block_n}x{warps}{'n' if nibble else ''}{'y' if nibble and lut == 'sym' else ''}"
    return dict(format=name, block_n=block_n, warps=warps, nibble=nibble, ablate=0,
                **_measure(src, arch, warps, dump, stem))  # fmt: skip


def compile_store(name: str, rows: int, warps: int, arch: int, dump: Path | None) -> dict:
    fmt = named_format(name, 128)
    kf = kernel_format(fmt)
    constexprs = dict(HAS_SLOT_MAPPING=True, HEAD_DIM=128, BLOCK_D=128, BLOCK_N=rows, K_BITS=kf.key.bits,
                      K_NORM=kf.key.norm_code, K_NC=fmt.key.norm_correction, V_BITS=kf.value.bits,
                      V_NORM=kf.value.norm_code, V_NC=fmt.value.norm_correction, DOT_PRECISION="tf32x3", K_CHUNK=32,
                      K_GS=fmt.key.gain_search, V_GS=fmt.value.gain_search, NUM_GAINS=len(GAIN_GRID),
                      **field_constexprs(fmt, 16))  # fmt: skip
    pointers = {"k_ptr": "*bf16", "v_ptr": "*bf16", "cache_ptr": "*u8", "slot_mapping_ptr": "*i64",
                "rot_ptr": "*fp32", "k_bnd_ptr": "*fp32", "v_bnd_ptr": "*fp32", "k_lut_ptr": "*fp32",
                "v_lut_ptr": "*fp32", "gain_ptr": "*fp32"}  # fmt: skip
    signature = {}
    for p in inspect.signature(_tq_store_kernel.fn).parameters:
        if p in constexprs:
            signature[p] = "constexpr"
        else:
            signature[p] = pointers.get(p) or ("i64" if p.startswith("stride") else "i32")
    attrs = {(i,): [["tt.divisibility", 16]] for i in range(len(pointers))}
    src = ASTSource(fn=_tq_store_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return dict(format=name, block_n=rows, warps=warps, nibble=False, ablate=0,
                **_measure(src, arch, warps, dump, f"store_{name}_{rows}x{warps}"))  # fmt: skip


def _measure(src: ASTSource, arch: int, warps: int, dump: Path | None, stem: str) -> dict:
    """Compile ``src`` for ``sm_<arch>`` and read registers and spills off ``ptxas -v``."""
    kernel = triton.compile(
        src,
        target=GPUTarget("cuda", arch, 32),
        options=dict(
            num_warps=warps,
            num_stages=int(os.environ.get("AOT_STAGES", "2")),
            **({"maxnreg": int(os.environ["AOT_MAXNREG"])} if os.environ.get("AOT_MAXNREG") else {}),
        ),
    )
    ttgir, ptx = kernel.asm["ttgir"], kernel.asm["ptx"]
    ptxas = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"
    with tempfile.TemporaryDirectory() as tmp:
        p = Path(tmp, "k.ptx")
        p.write_text(ptx)
        out = subprocess.run([str(ptxas), "-v", "--gpu-name", f"sm_{arch}a", str(p), "-o", str(Path(tmp, "k.cubin"))],
                             capture_output=True, text=True, check=True).stderr  # fmt: skip
        sass = subprocess.run([str(ptxas.parent / "cuobjdump"), "-sass", str(Path(tmp, "k.cubin"))],
                              capture_output=True, text=True, check=True).stdout  # fmt: skip
    regs = int(re.search(r"Used (\d+) registers", out).group(1))
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", out)
    if dump:
        dump.mkdir(parents=True, exist_ok=True)
        (dump / f"{stem}.ttgir").write_text(ttgir)
        (dump / f"{stem}.ptx").write_text(ptx)
        (dump / f"{stem}.sass").write_text(sass)
    return dict(registers=regs,
                spill_store_bytes=int(spill.group(1)), spill_load_bytes=int(spill.group(2)),
                shared_bytes=kernel.metadata.shared, programs_per_sm=REGISTERS_PER_SM // (regs * 32 * warps),
                convert_layouts=ttgir.count("ttg.convert_layout"), smem_staging=ttgir.count("ttg.local_alloc"),
                **loop_profile(sass))  # fmt: skip


def loop_profile(sass: str) -> dict:
    """Instruction mix of the kernel's longest loop (the tile loop): SASS lines between a label and the
    backward branch to it.  Counts are per iteration of the loop, i.e. per tile, across one warp."""
    lines = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4,6}\*/", ln)]
    addr = [int(re.match(r"\s+/\*([0-9a-f]{4,6})\*/", ln).group(1), 16) for ln in lines]
    best = (0, 0)
    for i, ln in enumerate(lines):
        m = re.search(r"BRA .*?0x([0-9a-f]+)", ln)  # the branch target, the first address after BRA
        target = int(m.group(1), 16) if m else None
        if target is not None and target < addr[i] and target in addr:
            j = addr.index(target)
            if i - j > best[1] - best[0]:
                best = (j, i)
    body = lines[best[0] : best[1] + 1]
    mix: dict[str, int] = {}
    for ln in body:
        op = re.sub(r"^\s+/\*[0-9a-f]{4,6}\*/\s+(@!?U?P\w+\s+)?", "", ln).split()[0].split(".")[0]
        mix[op] = mix.get(op, 0) + 1
    return dict(loop_instructions=len(body), loop_mix=dict(sorted(mix.items(), key=lambda kv: -kv[1])))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kernel", choices=("decode", "store", "extend"), default="decode")
    ap.add_argument(
        "--formats", default="turboquant_k8v4,turboquant_4bit_nc,turboquant_k3v4_nc,turboquant_3bit_nc"
    )
    ap.add_argument(
        "--configs",
        default="128x4,64x4,32x1n,32x1ny",
        help="BLOCK_N x num_warps[n|ny], comma-separated; a trailing n selects the NIBBLE loop (4-bit "
        "formats), ny the NIBBLE loop with the symmetric-table lookup, nb the byte tables read in pairs (decode), a further cK (decode) K stacked tiles a step",
    )
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument(
        "--ablate",
        type=int,
        default=0,
        help="decode: time the plane loop with stages left out (ablated_decode.py; 0: the real kernel)",
    )
    ap.add_argument("--dump", type=Path, help="write each variant's TTGIR and PTX here")
    args = ap.parse_args()
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="tq-aot-"))
    print(f"{'format':20s} {'config':>7s} {'regs':>5s} {'spill st/ld':>11s} {'smem':>6s} {'prog/SM':>7s} "
          f"{'converts':>8s} {'staging':>7s}")  # fmt: skip
    for name in args.formats.split(","):
        for cfg in args.configs.split(","):
            base, _, chunks = cfg.partition("c")  # a trailing cK: K stacked tiles a step (NIBBLE loop)
            bn, w = (int(x) for x in base.rstrip("nyb").split("x"))
            nib = base.rstrip("yb").endswith("n")
            lut = {"ny": "sym", "nb": "byte"}.get(base[-2:], "exact")
            if args.kernel == "store":
                r = compile_store(name, bn, w, args.arch, args.dump)
            elif args.kernel == "extend":
                r = compile_extend(name, bn, w, args.arch, args.dump, nib, lut)
            else:
                r = compile_decode(name, bn, w, args.arch, args.ablate, args.dump, nib, lut, int(chunks or 1))
            print(f"{name:20s} {cfg:>7s} {r['registers']:5d} {r['spill_store_bytes']:5d}/{r['spill_load_bytes']:<5d} "
                  f"{r['shared_bytes']:6d} {r['programs_per_sm']:7d} {r['convert_layouts']:8d} {r['smem_staging']:7d}  loop {r['loop_instructions']} instr/tile/warp {r['loop_mix']}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()

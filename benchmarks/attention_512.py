"""The VAE's attention (one head of 512 dims) in two Triton designs that keep float32 scores out of memory, under
several tile shapes, against the kernels the pack runs there (`matmul`: two cuBLAS GEMMs and a softmax kernel
over float32 scores in memory; `sdpa_efficient`), on one CUDA GPU:

  online  one kernel with an online softmax (the FlashAttention method). A program cannot hold a 512-wide
          output row block in registers, so each computes part of the output columns and recomputes Q K^T.
  tiled   two GEMMs, the softmax split into key tiles: the first GEMM's epilogue writes exp(S - m_t) of its
          tile in the input dtype with the tile's row maximum m_t and sum l_t; the second rescales each P tile
          by exp(m_t - M) on its way into P V and divides by L. No recomputation, half the bytes of `matmul`.

For each token count of a 1024, a 1536 (a tile of the 4096 budget run) and a 2048 output: GPU ms of each (CUDA
events, the median of 5), and its relative error against float32 attention on the first 512 queries. On an
H200 neither beat `matmul` at any size, so the pack does not use them; the script stays to measure them again
on other GPUs and Tritons:
  online (benchmarks/results/2026-11-30-h200-groupnorm-stats), the best tile shape: 2.61 / 13.9 / 39.1 ms
         against 1.43 / 8.1 / 26.1 ms at 16384 / 36864 / 65536 tokens;
  tiled (benchmarks/results/2026-11-30-h200-vae-attention-start-gap), the best of eleven tile shapes at each
         size: 1.70 / 9.06 / 26.7 ms against 1.49 / 8.12 / 26.2 ms (relative error 2.7e-3 against 2.35e-3).
         Triton's GEMMs here run well below cuBLAS's, which spends the bytes saved.

With `--kernels fp16`, `matmul`'s two paths at every size (it takes one by the number of keys: float32 scores
below MATMUL_FP16_FROM_KEYS, shifted fp16 scores from there); with `--kernels softmax`, its softmax kernel alone
on one block of fp16 scores, each row read once or twice, and the fp16 path's exponentials (kernels.shifted_exp).
On the H200
(benchmarks/results/2026-12-01-h200-fp16-scores/call3-attention, std 1): shifted fp16 7.3 / 22.6 ms against
float32 scores 8.2 / 25.7 ms at 36864 / 65536 tokens, relative error 1.8e-3 against 2.3e-3; at 16384 tokens the
conversions to fp16 ate the gain (1.67 against 1.37 ms, before they were trimmed; 1.35 against 1.25 ms GPU-only
after, call4-parts).

    python3 benchmarks/attention_512.py --json OUT.json [--kernels online,tiled,fp16,softmax] [--std 3]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hypir import kernels  # noqa: E402
from hypir.attention import MATMUL_BLOCK_BYTES, REGISTRY, AttentionBackend  # noqa: E402
from hypir.attention.backends import float32_score_attention, shifted_fp16_attention  # noqa: E402
from hypir.bench.common import gpu_ms  # noqa: E402


@triton.jit
def _online_softmax_attention(q_ptr, k_ptr, v_ptr, o_ptr, scale, NQ, NK, H, s_qb, s_qn, s_qh, s_kb, s_kn, s_kh,
                              s_vb, s_vn, s_vh, s_ob, s_on, s_oh, D: tl.constexpr, DV: tl.constexpr,
                              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # One program: BLOCK_M queries of one (batch, head), DV of the D output columns (program axis 2).
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    col = tl.program_id(2) * DV
    b = bh // H
    h = bh % H
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, D)
    dv = col + tl.arange(0, DV)
    keys = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + b * s_qb + h * s_qh + rows[:, None].to(tl.int64) * s_qn + d[None, :],
                mask=(rows < NQ)[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DV], dtype=tl.float32)
    qk_scale = scale * 1.4426950408889634  # exp2
    k_base = k_ptr + b * s_kb + h * s_kh
    v_base = v_ptr + b * s_vb + h * s_vh
    for start in range(0, NK, BLOCK_N):
        n = start + keys
        valid = n < NK
        k = tl.load(k_base + n[None, :].to(tl.int64) * s_kn + d[:, None], mask=valid[None, :], other=0.0)
        s = tl.dot(q, k) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + n[:, None].to(tl.int64) * s_vn + dv[None, :], mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(o_ptr + b * s_ob + h * s_oh + rows[:, None].to(tl.int64) * s_on + dv[None, :],
             acc.to(o_ptr.dtype.element_ty), mask=(rows < NQ)[:, None])


def online_softmax_attention(q, k, v, scale, block_m, block_n, dv, warps, stages):
    """(B, N, H, D) in and out."""
    b, n, h, d = q.shape
    out = torch.empty_like(q)
    grid = (triton.cdiv(n, block_m), b * h, d // dv)
    _online_softmax_attention[grid](q, k, v, out, scale, n, k.shape[1], h, *q.stride()[:3], *k.stride()[:3],
                                    *v.stride()[:3], *out.stride()[:3], D=d, DV=dv, BLOCK_M=block_m,
                                    BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return out


# (BLOCK_M, BLOCK_N, output columns a program, warps, stages)
CONFIGS = [
    (64, 64, 512, 8, 1), (64, 64, 512, 8, 2), (64, 32, 512, 8, 2), (64, 32, 512, 4, 2), (128, 64, 256, 8, 2),
    (128, 32, 256, 8, 2), (64, 64, 256, 4, 2), (128, 64, 128, 8, 2), (128, 128, 128, 8, 2),
]


# The two-GEMM design ("tiled").

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class TileConfig:
    """Tile shapes of the two kernels. block_k (the second GEMM's step over keys) divides block_n (the first
    GEMM's key tile, over which each (m_t, l_t) is taken)."""

    block_m: int = 128  # scores_tiles: queries a program
    block_n: int = 128  # scores_tiles: keys a program (a softmax tile)
    block_d: int = 64  # scores_tiles: head dims a step
    warps: int = 8
    stages: int = 3
    group_m: int = 8  # scores_tiles: row blocks that sweep the key tiles together (L2 reuse of K)
    pv_block_m: int = 128  # probs_values: queries a program
    block_k: int = 64  # probs_values: keys a step
    block_dv: int = 256  # probs_values: output columns a program
    pv_warps: int = 8
    pv_stages: int = 3

    def __post_init__(self):
        if self.block_n % self.block_k:
            raise ValueError(f"block_k {self.block_k} must divide block_n {self.block_n}")


DEFAULT_TILES = TileConfig()
P_CHUNK_BYTES = 1 << 30  # P (input dtype) held at once: queries a chunk


@triton.jit
def scores_tiles(q_ptr, k_ptr, p_ptr, m_ptr, l_ptr, qk_scale, NQ, NK, H, TILES,
                 s_qb, s_qn, s_qh, s_kb, s_kn, s_kh, s_pz,
                 D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                 GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    z = tl.program_id(1)  # batch * heads
    b = z // H
    h = z % H
    num_m = tl.cdiv(NQ, BLOCK_M)
    in_group = GROUP_M * TILES
    first_m = (pid // in_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_size
    pid_n = (pid % in_group) // group_size
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < NQ
    col_ok = cols < NK
    q_base = q_ptr + b.to(tl.int64) * s_qb + h * s_qh + rows[:, None].to(tl.int64) * s_qn
    k_base = k_ptr + b.to(tl.int64) * s_kb + h * s_kh + cols[:, None].to(tl.int64) * s_kn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        q = tl.load(q_base + (d0 + dims)[None, :], mask=row_ok[:, None], other=0.0)
        k = tl.load(k_base + (d0 + dims)[None, :], mask=col_ok[:, None], other=0.0)
        acc = tl.dot(q, tl.trans(k), acc)
    s = tl.where(col_ok[None, :], acc * qk_scale, float("-inf"))
    m = tl.max(s, 1)
    p = tl.math.exp2(s - m[:, None])
    l = tl.sum(p, 1)
    p_rows = p_ptr + z.to(tl.int64) * s_pz + rows[:, None].to(tl.int64) * NK
    tl.store(p_rows + cols[None, :], p.to(p_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
    stats = (z.to(tl.int64) * NQ + rows) * TILES + pid_n
    tl.store(m_ptr + stats, m, mask=row_ok)
    tl.store(l_ptr + stats, l, mask=row_ok)

@triton.jit
def probs_values(p_ptr, m_ptr, l_ptr, v_ptr, o_ptr, NQ, NK, H, TILES, s_pz, s_vb, s_vn, s_vh, s_ob, s_on, s_oh,
                 TILE_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_DV: tl.constexpr,
                 D: tl.constexpr, STATS_BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # output column blocks of one row block next to each other: they share P in L2
    z = tl.program_id(1)
    b = z // H
    h = z % H
    col_blocks = D // BLOCK_DV
    pid_m = pid // col_blocks
    dv = (pid % col_blocks) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < NQ
    stats_rows = (z.to(tl.int64) * NQ + rows) * TILES
    # The row's maximum over its tiles, then its sum of exp(S - M).
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for t0 in range(0, TILES, STATS_BLOCK):
        t = t0 + tl.arange(0, STATS_BLOCK)
        ok = row_ok[:, None] & (t < TILES)[None, :]
        row_max = tl.maximum(row_max, tl.max(tl.load(m_ptr + stats_rows[:, None] + t[None, :], mask=ok,
                                                     other=float("-inf")), 1))
    row_max = tl.where(row_ok, row_max, 0.0)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for t0 in range(0, TILES, STATS_BLOCK):
        t = t0 + tl.arange(0, STATS_BLOCK)
        ok = row_ok[:, None] & (t < TILES)[None, :]
        m_t = tl.load(m_ptr + stats_rows[:, None] + t[None, :], mask=ok, other=float("-inf"))
        l_t = tl.load(l_ptr + stats_rows[:, None] + t[None, :], mask=ok, other=0.0)
        row_sum += tl.sum(l_t * tl.math.exp2(m_t - row_max[:, None]), 1)
    keys = tl.arange(0, BLOCK_K)
    p_rows = p_ptr + z.to(tl.int64) * s_pz + rows[:, None].to(tl.int64) * NK
    v_base = v_ptr + b.to(tl.int64) * s_vb + h * s_vh + dv[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for k0 in range(0, NK, BLOCK_K):
        n = k0 + keys
        n_ok = n < NK
        p = tl.load(p_rows + n[None, :], mask=row_ok[:, None] & n_ok[None, :], other=0.0)
        m_t = tl.load(m_ptr + stats_rows + k0 // TILE_N, mask=row_ok, other=0.0)
        p = (p.to(tl.float32) * tl.math.exp2(m_t - row_max)[:, None]).to(v_ptr.dtype.element_ty)
        v = tl.load(v_base + n[:, None].to(tl.int64) * s_vn, mask=n_ok[:, None], other=0.0)
        acc = tl.dot(p, v, acc)
    acc = acc / row_sum[:, None]
    out = o_ptr + b.to(tl.int64) * s_ob + h * s_oh + rows[:, None].to(tl.int64) * s_on + dv[None, :]
    tl.store(out, acc.to(o_ptr.dtype.element_ty), mask=row_ok[:, None])


def chunk_rows(queries: int, keys: int, heads: int, itemsize: int, block_m: int,
               budget: int = P_CHUNK_BYTES) -> int:
    """Queries a chunk: P (heads x rows x keys) within `budget` bytes, a whole number of row blocks."""
    rows = budget // max(1, heads * keys * itemsize)
    return max(block_m, min(queries, rows // block_m * block_m) if rows < queries else queries)


def tiled_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                            tiles: TileConfig = DEFAULT_TILES, p_chunk_bytes: int = P_CHUNK_BYTES) -> torch.Tensor:
    """softmax(Q K^T * scale) V for (B, N, H, D) fp16/bf16 tensors whose last dimension is contiguous, with D a
    multiple of tiles.block_dv and of tiles.block_d; (B, N, H, D) out. On CUDA (on the CPU, Triton's
    interpreter runs it in fp16 and fp32: its tl.dot of bf16 is wrong in Triton 3.6)."""
    b, n, h, d = q.shape
    nk = k.shape[1]
    if d % tiles.block_dv or d % tiles.block_d:
        raise ValueError(f"head_dim {d} is not a multiple of {tiles.block_dv} and {tiles.block_d}")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        raise ValueError("q, k and v need a contiguous last dimension")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    n_tiles = triton.cdiv(nk, tiles.block_n)
    rows = chunk_rows(n, nk, b * h, q.element_size(), max(tiles.block_m, tiles.pv_block_m), p_chunk_bytes)
    probs = torch.empty((b * h, rows, nk), device=q.device, dtype=q.dtype)
    row_max = torch.empty((b * h, rows, n_tiles), device=q.device, dtype=torch.float32)
    row_sum = torch.empty_like(row_max)
    stats_block = min(128, triton.next_power_of_2(n_tiles))
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        for start in range(0, n, rows):
            qc, oc = q[:, start:start + rows], out[:, start:start + rows]
            nq = qc.shape[1]
            grid = (triton.cdiv(nq, tiles.block_m) * n_tiles, b * h)
            scores_tiles[grid](qc, k, probs, row_max, row_sum, scale * LOG2E, nq, nk, h, n_tiles,
                               qc.stride(0), qc.stride(1), qc.stride(2), k.stride(0), k.stride(1), k.stride(2),
                               probs.stride(0), D=d, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
                               BLOCK_D=tiles.block_d, GROUP_M=tiles.group_m, num_warps=tiles.warps,
                               num_stages=tiles.stages)
            grid = (triton.cdiv(nq, tiles.pv_block_m) * (d // tiles.block_dv), b * h)
            probs_values[grid](probs, row_max, row_sum, v, oc, nq, nk, h, n_tiles, probs.stride(0),
                               v.stride(0), v.stride(1), v.stride(2), oc.stride(0), oc.stride(1), oc.stride(2),
                               TILE_N=tiles.block_n, BLOCK_M=tiles.pv_block_m, BLOCK_K=tiles.block_k,
                               BLOCK_DV=tiles.block_dv, D=d, STATS_BLOCK=stats_block, num_warps=tiles.pv_warps,
                               num_stages=tiles.pv_stages)
    return out


# Two GEMMs with the softmax split into key tiles: (scores_tiles: queries,
# keys, dims a step, warps, stages), (probs_values: queries, keys a step, output columns, warps, stages).
TILED = [
    ((128, 128, 64, 8, 3), (128, 64, 256, 8, 3)),
    ((128, 128, 64, 4, 3), (128, 64, 256, 8, 3)),
    ((128, 256, 64, 8, 3), (128, 64, 256, 8, 3)),
    ((64, 128, 64, 4, 4), (128, 64, 256, 8, 3)),
    ((128, 128, 128, 8, 2), (128, 64, 256, 8, 3)),
    ((128, 128, 64, 8, 3), (64, 32, 512, 8, 3)),
    ((128, 128, 64, 8, 3), (64, 64, 512, 8, 2)),
    ((128, 128, 64, 8, 3), (128, 64, 128, 4, 4)),
    ((128, 128, 64, 8, 3), (128, 128, 256, 8, 2)),
    ((128, 128, 64, 8, 3), (128, 32, 256, 8, 4)),
    ((128, 128, 64, 8, 4), (128, 64, 256, 8, 4)),
]


def tiled_config(scores: tuple, values: tuple) -> TileConfig:
    return TileConfig(block_m=scores[0], block_n=scores[1], block_d=scores[2], warps=scores[3], stages=scores[4],
                      pv_block_m=values[0], block_k=values[1], block_dv=values[2], pv_warps=values[3],
                      pv_stages=values[4])


@contextlib.contextmanager
def patched(owner, name, value):
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, before)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--tokens", default="16384,36864,65536")
    parser.add_argument("--kernels", default="online,tiled",
                        help="online (one kernel), tiled (two GEMMs), fp16 (matmul's float32-score and shifted "
                             "fp16-score paths), softmax (the softmax kernel alone, its rows read once or twice)")
    parser.add_argument("--std", type=float, default=1.0,
                        help="std of Q, K and V: 1 gives logits of std 1, 3 of std 9")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "std": args.std, "rows": []}
    for tokens in (int(t) for t in args.tokens.split(",")):
        g = torch.Generator(device="cuda").manual_seed(tokens)
        q, k, v = (torch.randn(1, tokens, 1, 512, device="cuda", generator=g).mul(args.std).to(torch.bfloat16)
                   for _ in range(3))
        scale = 512 ** -0.5
        probs = torch.softmax((q[0, :512, 0].float() @ k[0, :, 0].float().T) * scale, dim=-1)
        exact = probs @ v[0, :, 0].float()
        row = {"tokens": tokens, "kernels": {}}
        variants = {"matmul": lambda: REGISTRY[AttentionBackend.MATMUL].fn(q, k, v, scale),
                    "sdpa_efficient": lambda: REGISTRY[AttentionBackend.SDPA_EFFICIENT].fn(q, k, v, scale)}
        if "fp16" in args.kernels:  # matmul's two paths at every size (it takes one by the number of keys)
            variants["float32 scores"] = lambda: float32_score_attention(q, k, v, scale)
            variants["shifted fp16 scores"] = lambda: shifted_fp16_attention(q, k, v, scale)
        if "softmax" in args.kernels:
            rows = min(tokens, MATMUL_BLOCK_BYTES // (4 * tokens))  # one block of matmul's
            scores = (q[0, :rows, 0] @ k[0, :, 0].T).to(torch.float16)[None]
            for limit, name in ((1 << 30, "softmax, a row read once"), (0, "softmax, a row read twice")):
                def softmax(limit=limit):
                    with patched(kernels, "SOFTMAX_ONE_READ_MAX", limit):
                        return kernels.scaled_softmax(scores, scale, torch.float16)
                variants[f"{name} ({rows} rows)"] = softmax
            # The fp16 path's exponentials without the division (kernels.shifted_exp), on scores shifted by a
            # sampled largest as that path makes them: one read of each score and one write.
            shifted = (scores.float() - scores[..., ::64].float().amax(dim=-1, keepdim=True)).to(torch.float16)
            variants[f"softmax, shifted exp ({rows} rows)"] = lambda: kernels.shifted_exp(shifted, scale, 256.0, 5.0)
        if "online" in args.kernels:
            for config in CONFIGS:
                variants["triton %dx%d dv%d w%d s%d" % config] = (
                    lambda config=config: online_softmax_attention(q, k, v, scale, *config))
        if "tiled" in args.kernels:
            for scores, values in TILED:
                name = "tiled %dx%d d%d w%d s%d / %dx%d dv%d w%d s%d" % (*scores, *values)
                variants[name] = lambda c=tiled_config(scores, values): tiled_softmax_attention(q, k, v, scale, c)
        for name, fn in variants.items():
            try:
                out = fn()
                err = (None if name.startswith("softmax") else
                       ((out[0, :512, 0].float() - exact).norm() / exact.norm()).item())
                row["kernels"][name] = {"ms": gpu_ms(fn), "rel_err": err}
            except Exception as exc:  # noqa: BLE001 - a tile shape that does not fit is a result too
                row["kernels"][name] = {"error": str(exc).splitlines()[0][:200]}
            print(tokens, name, json.dumps(row["kernels"][name]), flush=True)
        result["rows"].append(row)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The VAE's attention (one head of 512 dims) as one Triton kernel with an online softmax (the FlashAttention
method: no scores in memory) under several tile shapes, against the kernels the pack runs there today (`matmul`:
two GEMMs and a softmax kernel over float32 scores in memory; `sdpa_efficient`), on one CUDA GPU.

For each token count of a 1024, a 1536 (a tile of the 4096 budget run) and a 2048 output: GPU ms of each (CUDA
events, the median of 5), and its relative error against float32 attention on the first 512 queries. On an H200
(benchmarks/results/2026-11-30-h200-groupnorm-stats) the best tile shape took 1.5 to 1.8 times `matmul`'s time
at every size, so the pack does not use it; the script stays to measure it again on other GPUs and Tritons.

    python3 benchmarks/attention_512.py --json OUT.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from hypir.attention import REGISTRY, AttentionBackend  # noqa: E402
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


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True)
    parser.add_argument("--tokens", default="16384,36864,65536")
    args = parser.parse_args()
    result = {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "rows": []}
    for tokens in (int(t) for t in args.tokens.split(",")):
        g = torch.Generator(device="cuda").manual_seed(tokens)
        q, k, v = (torch.randn(1, tokens, 1, 512, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
        scale = 512 ** -0.5
        probs = torch.softmax((q[0, :512, 0].float() @ k[0, :, 0].float().T) * scale, dim=-1)
        exact = probs @ v[0, :, 0].float()
        row = {"tokens": tokens, "kernels": {}}
        variants = {"matmul": lambda: REGISTRY[AttentionBackend.MATMUL].fn(q, k, v, scale),
                    "sdpa_efficient": lambda: REGISTRY[AttentionBackend.SDPA_EFFICIENT].fn(q, k, v, scale)}
        for config in CONFIGS:
            variants["triton %dx%d dv%d w%d s%d" % config] = (
                lambda config=config: online_softmax_attention(q, k, v, scale, *config))
        for name, fn in variants.items():
            try:
                out = fn()
                err = ((out[0, :512, 0].float() - exact).norm() / exact.norm()).item()
                row["kernels"][name] = {"ms": gpu_ms(fn), "rel_err": err}
            except Exception as exc:  # noqa: BLE001 - a tile shape that does not fit is a result too
                row["kernels"][name] = {"error": str(exc).splitlines()[0][:200]}
            print(tokens, name, json.dumps(row["kernels"][name]), flush=True)
        result["rows"].append(row)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

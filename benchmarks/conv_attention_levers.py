"""Kernel levers for the convolutions and the UNet's attention that the pack does not use, measured against the
kernels it runs (PyTorch's cuDNN convolution and cuDNN attention), per SD2.1 shape, on one CUDA GPU:

  fp8-attention  cuDNN's FP8 (e4m3) flash attention (the cuDNN frontend's graph API: `pip install
                 nvidia-cudnn-frontend`), per-tensor scales for Q, K, V and the output, at head_dim 64 and the
                 UNet's token counts of a 1024 and a 2048 output.
  fp8-conv       cuDNN's FP8 3x3 convolution (per-tensor input scale, per-channel weight scales applied with the
                 bias in its epilogue, bf16 output), at the UNet's and the VAE's shapes of a 2048 output.
  norm-prologue  cuDNN's 3x3 convolution with GroupNorm's apply and SiLU as its prologue (for one image the apply
                 is x * a_c + b_c per channel) and with the bias and the skip connection as its epilogue,
                 against the pack's GroupNorm+SiLU kernel followed by the convolution.
  triton-conv    a 3x3 convolution as an implicit GEMM in Triton: TMA tensor descriptors load each tap's shifted
                 tile, their zero fill out of bounds is the padding; six tile configurations.

Times are GPU milliseconds (hypir.bench.common.gpu_ms: CUDA events, the median of 5 groups of 10 calls);
errors are relative to a float32 computation. On the H200 (benchmarks/results/2026-12-01-h200-levers-and-
cards, cuDNN 9.19, frontend 1.32.0) none of them pays:
  fp8-attention  1.10x to 1.21x of bf16 (10.71 against 12.02 ms at 65536 tokens x 5 heads), relative error 0.087
                 to 0.106 against 0.0017, before quantizing Q, K and V (0.37 to 0.63 ms with PyTorch's ops);
  fp8-conv       0.32x to 0.99x of bf16 (which runs at 636 to 804 TFLOP/s), before quantizing the input;
  norm-prologue  2.5x to 3.8x the convolution alone (1.71 against 0.45 ms at 128 channels of 1024x1024), slower
                 than the GroupNorm kernel and the convolution one after the other at every shape;
  triton-conv    0.86x to 1.05x of cuDNN.

    python3 benchmarks/conv_attention_levers.py --json OUT.json [--parts fp8-attention,fp8-conv,...]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hypir.bench.common import gpu_ms  # noqa: E402
from hypir.kernels import group_norm_silu  # noqa: E402

E4M3 = torch.float8_e4m3fn
FP8_MAX = 448.0


def timed(fn) -> float:
    return gpu_ms(fn, calls=10)


def relative_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double(), ref.double()
    return float((x - ref).norm() / ref.norm())


def quantized(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """t in e4m3 with one scale for the tensor, and the descale (amax / 448) as a (1, 1, 1, 1) float32 tensor."""
    amax = t.abs().amax().float().clamp_min(1e-12)
    return (t.float() * (FP8_MAX / amax)).to(E4M3), (amax / FP8_MAX).reshape(1, 1, 1, 1)


class CudnnGraphs:
    def __init__(self):
        import cudnn

        self.cudnn = cudnn
        self.handle = cudnn.create_handle()
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)

    def graph(self, io):
        c = self.cudnn
        return c.pygraph(io_data_type=io, intermediate_data_type=c.data_type.FLOAT,
                         compute_data_type=c.data_type.FLOAT, handle=self.handle)

    def built(self, g):
        g.validate()
        g.build_operation_graph()
        g.create_execution_plans([self.cudnn.heur_mode.A, self.cudnn.heur_mode.FALLBACK])
        g.check_support()
        g.build_plans()
        workspace = torch.empty(g.get_workspace_size(), device="cuda", dtype=torch.uint8)
        return lambda pack: g.execute(pack, workspace, handle=self.handle)


def nhwc(n: int, c: int, h: int, w: int) -> dict:
    return dict(dim=(n, c, h, w), stride=(c * h * w, 1, w * c, c))


def per_channel(c: int) -> dict:
    return dict(dim=(1, c, 1, 1), stride=(c, 1, c, c))


def part_fp8_attention(graphs: CudnnGraphs) -> list[dict]:
    c = graphs.cudnn
    e4m3, fp32 = c.data_type.FP8_E4M3, c.data_type.FLOAT
    rows = []
    for tokens, heads in ((65536, 5), (16384, 10), (16384, 5), (4096, 20), (4096, 10)):
        row = {"tokens": tokens, "heads": heads, "head_dim": 64}
        try:
            gen = torch.Generator(device="cuda").manual_seed(0)
            shape = (1, tokens, heads, 64)
            basis = torch.randn(8, 64, device="cuda", generator=gen)
            q, k, v = (torch.randn(shape, device="cuda", generator=gen) for _ in range(3))
            # queries and keys share a low-rank part, so that the softmax is not flat
            q = (q + torch.randn(*shape[:3], 8, device="cuda", generator=gen) @ basis * 0.5).bfloat16()
            k = (k + torch.randn(*shape[:3], 8, device="cuda", generator=gen) @ basis * 0.5).bfloat16()
            v = v.bfloat16()
            scale = 1 / 8
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
            ref = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float(), scale=scale)
            bf16 = lambda: torch.ops.aten._scaled_dot_product_cudnn_attention(qt, kt, vt, None, False,  # noqa: E731
                                                                              scale=scale)[0]
            row["bf16_cudnn_ms"] = timed(bf16)
            row["bf16_cudnn_error"] = relative_error(bf16(), ref)

            g = graphs.graph(e4m3)
            dims = dict(dim=(1, heads, tokens, 64), stride=(tokens * heads * 64, 64, heads * 64, 1))
            tq, tk, tv = (g.tensor(name=n, data_type=e4m3, **dims) for n in ("q", "k", "v"))
            scalars = [g.tensor(name=n, dim=(1, 1, 1, 1), stride=(1, 1, 1, 1), data_type=fp32)
                       for n in ("dq", "dk", "dv", "ds", "ss", "so")]
            o, _, amax_s, amax_o = g.sdpa_fp8(q=tq, k=tk, v=tv, descale_q=scalars[0], descale_k=scalars[1],
                                              descale_v=scalars[2], descale_s=scalars[3], scale_s=scalars[4],
                                              scale_o=scalars[5], attn_scale=scale, use_causal_mask=False,
                                              generate_stats=False)
            o.set_output(True).set_data_type(e4m3).set_dim(dims["dim"]).set_stride(dims["stride"])  # Hopper: FP8 O
            for amax in (amax_s, amax_o):
                amax.set_output(True).set_dim((1, 1, 1, 1)).set_stride((1, 1, 1, 1)).set_data_type(fp32)
            run = graphs.built(g)
            (q8, dq), (k8, dk), (v8, dv) = quantized(q), quantized(k), quantized(v)
            one = torch.ones(1, 1, 1, 1, device="cuda")
            scale_o = FP8_MAX / (dv * FP8_MAX)  # |O| <= max |V|
            o8 = torch.empty(shape, device="cuda", dtype=E4M3)
            pack = {tq: q8, tk: k8, tv: v8, scalars[0]: dq, scalars[1]: dk, scalars[2]: dv,
                    scalars[3]: one / FP8_MAX, scalars[4]: one * FP8_MAX, scalars[5]: scale_o, o: o8,
                    amax_s: torch.empty_like(one), amax_o: torch.empty_like(one)}
            row["fp8_cudnn_ms"] = timed(lambda: run(pack))
            run(pack)
            row["fp8_cudnn_error"] = relative_error((o8.float() / scale_o.reshape(())).transpose(1, 2), ref)
            row["quantize_qkv_ms"] = timed(lambda: [quantized(t) for t in (q, k, v)])
            row["speedup"] = row["bf16_cudnn_ms"] / row["fp8_cudnn_ms"]
        except Exception:  # noqa: BLE001 - a shape the library declines is a result too
            row["error"] = traceback.format_exc()[-1500:]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


CONV_SHAPES = (  # (in channels, side, out channels): a 2048 output's UNet levels and VAE levels, and a 1024's
    (320, 256, 320), (640, 128, 640), (512, 256, 512), (512, 512, 512), (256, 1024, 256), (128, 2048, 128),
    (128, 1024, 128), (256, 512, 256), (128, 512, 256), (256, 1024, 128))


def conv_inputs(c: int, side: int, k: int):
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(1, c, side, side, device="cuda", generator=gen).bfloat16().to(memory_format=torch.channels_last)
    w = (torch.randn(k, c, 3, 3, device="cuda", generator=gen) / math.sqrt(9 * c)).bfloat16().to(
        memory_format=torch.channels_last)
    return x, w


def part_fp8_conv(graphs: CudnnGraphs) -> list[dict]:
    c8 = graphs.cudnn
    e4m3, fp32, bf16 = c8.data_type.FP8_E4M3, c8.data_type.FLOAT, c8.data_type.BFLOAT16
    rows = []
    for c, side, k in CONV_SHAPES:
        row = {"in": c, "side": side, "out": k}
        try:
            x, w = conv_inputs(c, side, k)
            bias = torch.randn(k, device="cuda") * 0.1
            flops = 2 * k * c * 9 * side * side
            ref = F.conv2d(x.float(), w.float(), bias, padding=1)
            row["bf16_ms"] = timed(lambda: F.conv2d(x, w, None, padding=1))
            row["bf16_tflops"] = flops / row["bf16_ms"] / 1e9
            g = graphs.graph(e4m3)
            tx = g.tensor(name="x", data_type=e4m3, **nhwc(1, c, side, side))
            tw = g.tensor(name="w", data_type=e4m3, **nhwc(k, c, 3, 3))
            td = g.tensor(name="descale", data_type=fp32, **per_channel(k))
            tb = g.tensor(name="bias", data_type=fp32, **per_channel(k))
            y = g.conv_fprop(image=tx, weight=tw, padding=(1, 1), stride=(1, 1), dilation=(1, 1),
                             compute_data_type=fp32)
            ty = g.add(a=g.mul(a=y, b=td, compute_data_type=fp32), b=tb, compute_data_type=fp32)
            ty.set_output(True).set_data_type(bf16).set_dim(nhwc(1, k, side, side)["dim"]).set_stride(
                nhwc(1, k, side, side)["stride"])
            run = graphs.built(g)
            x8, dx = quantized(x)
            wmax = w.float().abs().amax(dim=(1, 2, 3)).clamp_min(1e-12)
            w8 = (w.float() * (FP8_MAX / wmax).reshape(-1, 1, 1, 1)).to(E4M3).contiguous(
                memory_format=torch.channels_last)
            out = torch.empty(1, k, side, side, device="cuda", dtype=torch.bfloat16).to(
                memory_format=torch.channels_last)
            pack = {tx: x8, tw: w8, td: (dx.reshape(()) * wmax / FP8_MAX).reshape(1, k, 1, 1).contiguous(),
                    tb: bias.reshape(1, k, 1, 1).contiguous(), ty: out}
            row["fp8_ms"] = timed(lambda: run(pack))
            run(pack)
            row["fp8_tflops"] = flops / row["fp8_ms"] / 1e9
            row["fp8_error"] = relative_error(out, ref)
            row["quantize_input_ms"] = timed(lambda: quantized(x))
            row["speedup_before_quantizing"] = row["bf16_ms"] / row["fp8_ms"]
        except Exception:  # noqa: BLE001
            row["error"] = traceback.format_exc()[-1500:]
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def part_norm_prologue(graphs: CudnnGraphs) -> list[dict]:
    c8 = graphs.cudnn
    fp32, bf16 = c8.data_type.FLOAT, c8.data_type.BFLOAT16
    groups, eps = 32, 1e-6
    rows = []
    for c, side, k in CONV_SHAPES:
        if c != k:
            continue
        row = {"channels": c, "side": side}
        try:
            x, w = conv_inputs(c, side, k)
            x = (x.float() * 2 + 0.5).bfloat16().contiguous(memory_format=torch.channels_last)
            gamma = (torch.rand(c, device="cuda") + 0.5).bfloat16()  # the models' GroupNorms are bf16 too
            beta = (torch.randn(c, device="cuda") * 0.1).bfloat16()
            bias = torch.randn(k, device="cuda") * 0.1
            skip = torch.randn_like(x)
            conv = lambda h: F.conv2d(h, w, None, padding=1)  # noqa: E731
            row["conv_ms"] = timed(lambda: conv(x))
            row["norm_silu_then_conv_ms"] = timed(lambda: conv(group_norm_silu(x, gamma, beta, groups, eps, True)))
            xg = x.float().reshape(1, groups, -1)
            mean, rstd = xg.mean(-1), (xg.var(-1, unbiased=False) + eps).rsqrt()
            gamma, beta = gamma.float(), beta.float()
            a = gamma * rstd.repeat_interleave(c // groups, dim=1)[0]
            b = beta - mean.repeat_interleave(c // groups, dim=1)[0] * a
            ref = F.conv2d(F.silu(F.group_norm(x.float(), groups, gamma, beta, eps)), w.float(), None, padding=1)
            for name, epilogue in (("fused_prologue", False), ("fused_prologue_epilogue", True)):
                g = graphs.graph(bf16)
                tx = g.tensor(name="x", data_type=bf16, **nhwc(1, c, side, side))
                tw = g.tensor(name="w", data_type=bf16, **nhwc(k, c, 3, 3))
                ta = g.tensor(name="a", data_type=fp32, **per_channel(c))
                tb = g.tensor(name="b", data_type=fp32, **per_channel(c))
                h = g.swish(input=g.add(a=g.mul(a=tx, b=ta), b=tb))
                h.set_data_type(bf16)
                y = g.conv_fprop(image=h, weight=tw, padding=(1, 1), stride=(1, 1), dilation=(1, 1),
                                 compute_data_type=fp32)
                pack = {tx: x, tw: w, ta: a.reshape(1, c, 1, 1).contiguous(), tb: b.reshape(1, c, 1, 1).contiguous()}
                want = ref
                if epilogue:
                    tbias = g.tensor(name="bias", data_type=fp32, **per_channel(k))
                    tskip = g.tensor(name="skip", data_type=bf16, **nhwc(1, k, side, side))
                    y = g.add(a=g.add(a=y, b=tbias), b=tskip)
                    pack.update({tbias: bias.reshape(1, k, 1, 1).contiguous(), tskip: skip})
                    want = ref + bias.reshape(1, k, 1, 1) + skip.float()
                y.set_output(True).set_data_type(bf16).set_dim(nhwc(1, k, side, side)["dim"]).set_stride(
                    nhwc(1, k, side, side)["stride"])
                out = torch.empty_like(x)
                pack[y] = out
                run = graphs.built(g)
                row[f"{name}_ms"] = timed(lambda: run(pack))
                run(pack)
                row[f"{name}_error"] = relative_error(out, want)
        except Exception:  # noqa: BLE001
            row["error"] = traceback.format_exc()[-1500:]
        print(json.dumps(row), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def part_triton_conv() -> list[dict]:
    import triton
    import triton.language as tl
    from triton.tools.tensor_descriptor import TensorDescriptor

    @triton.jit
    def conv3x3(x_desc, w_desc, y_desc, H, W, C: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                BK: tl.constexpr, STAGES: tl.constexpr):
        pid = tl.program_id(0)
        w_tiles = tl.cdiv(W, BM)
        row = pid // w_tiles
        w0 = (pid % w_tiles) * BM
        n = row // H
        h = row % H
        KC: tl.constexpr = C // BK
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for i in tl.range(0, 9 * KC, num_stages=STAGES):
            tap = i // KC
            kc = i % KC
            a = x_desc.load([n, h + tap // 3 - 1, w0 + tap % 3 - 1, kc * BK]).reshape(BM, BK)
            b = w_desc.load([tap * C + kc * BK, tl.program_id(1) * BN])
            acc = tl.dot(a, b, acc)
        y_desc.store([n, h, w0, tl.program_id(1) * BN], acc.to(y_desc.dtype).reshape(1, 1, BM, BN))

    def run(x, w_rows, BM, BN, BK, STAGES, warps):
        n, c, h, wd = x.shape
        k = w_rows.shape[1]
        xv = x.permute(0, 2, 3, 1)
        y = torch.empty((n, k, h, wd), device=x.device, dtype=x.dtype, memory_format=torch.channels_last)
        yv = y.permute(0, 2, 3, 1)
        descriptors = (TensorDescriptor(xv, list(xv.shape), list(xv.stride()), [1, 1, BM, BK]),
                       TensorDescriptor(w_rows, list(w_rows.shape), list(w_rows.stride()), [BK, BN]),
                       TensorDescriptor(yv, list(yv.shape), list(yv.stride()), [1, 1, BM, BN]))
        conv3x3[(n * h * triton.cdiv(wd, BM), triton.cdiv(k, BN))](*descriptors, h, wd, c, BM, BN, BK, STAGES,
                                                                  num_warps=warps)
        return y

    # TMA descriptors need a scratch allocator in some Triton versions
    triton.set_allocator(lambda size, align, stream: torch.empty(size, device="cuda", dtype=torch.int8))
    configs = [(128, 128, 64, 3, 8), (128, 128, 64, 4, 8), (128, 128, 64, 3, 4), (256, 128, 64, 3, 8),
               (128, 256, 64, 3, 8), (64, 128, 64, 4, 4)]
    rows = []
    for c, side, k in CONV_SHAPES:
        row = {"in": c, "side": side, "out": k}
        x, w = conv_inputs(c, side, k)
        w_rows = w.permute(2, 3, 1, 0).reshape(9 * c, k).contiguous()  # rows (tap, in channel)
        flops = 2 * k * c * 9 * side * side
        ref = F.conv2d(x.float(), w.float(), None, padding=1)
        row["cudnn_ms"] = timed(lambda: F.conv2d(x, w, None, padding=1))
        row["cudnn_tflops"] = flops / row["cudnn_ms"] / 1e9
        best = None
        for config in configs:
            if k % config[1] or c % config[2]:
                continue
            name = "BM{}_BN{}_BK{}_stages{}_warps{}".format(*config)
            try:
                error = relative_error(run(x, w_rows, *config), ref)
                ms = timed(lambda: run(x, w_rows, *config))
                row[name] = {"ms": ms, "error": error}
                if best is None or ms < best[1]:
                    best = (name, ms)
            except Exception:  # noqa: BLE001
                row[name] = traceback.format_exc()[-600:]
        if best:
            row["best"], row["best_tflops"] = best[0], flops / best[1] / 1e9
            row["speedup"] = row["cudnn_ms"] / best[1]
        print(json.dumps({key: value for key, value in row.items() if not key.startswith("BM")}), flush=True)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--parts", default="fp8-attention,fp8-conv,norm-prologue,triton-conv")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.backends.cudnn.benchmark = True
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "parts": {}}
    parts = args.parts.split(",")
    graphs = None
    if any(p in parts for p in ("fp8-attention", "fp8-conv", "norm-prologue")):
        graphs = CudnnGraphs()
        report["cudnn_frontend"] = getattr(graphs.cudnn, "__version__", "unknown")
    for part in parts:
        print(f"== {part}", flush=True)
        run = {"fp8-attention": lambda: part_fp8_attention(graphs), "fp8-conv": lambda: part_fp8_conv(graphs),
               "norm-prologue": lambda: part_norm_prologue(graphs), "triton-conv": part_triton_conv}[part]
        report["parts"][part] = run()
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

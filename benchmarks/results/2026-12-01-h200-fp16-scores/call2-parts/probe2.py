"""Probe 2: the fp16-score VAE attention's parts, P in fp16, and a one-pass softmax (the row in registers)."""
import json, sys
from pathlib import Path
import torch, triton, triton.language as tl
sys.path.insert(0, str(Path.cwd()))
sys.argv, out_dir = sys.argv[:1] + sys.argv[2:], Path(sys.argv[1])
from hypir.attention import REGISTRY, AttentionBackend
from hypir.bench.common import gpu_ms



@triton.jit
def softmax_any(s_ptr, o_ptr, M, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * M
    running_max = tl.full([BLOCK], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, M, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        v = tl.load(s_ptr + row + cols, mask=cols < M, other=float("-inf")).to(tl.float32) * scale
        new_max = tl.maximum(running_max, v)
        pivot = tl.where(new_max > float("-inf"), new_max, 0.0)
        running_sum = running_sum * tl.exp(running_max - pivot) + tl.exp(v - pivot)
        running_max = new_max
    row_max = tl.max(running_max, axis=0)
    row_sum = tl.sum(running_sum * tl.exp(running_max - row_max), axis=0)
    for start in range(0, M, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        v = tl.load(s_ptr + row + cols, mask=cols < M, other=float("-inf")).to(tl.float32) * scale
        p = tl.exp(v - row_max) / row_sum
        tl.store(o_ptr + row + cols, p.to(o_ptr.dtype.element_ty), mask=cols < M)


def soft(scores, scale, dtype, warps=8, block=4096):
    m = scores.shape[-1]
    out = torch.empty(scores.shape, device=scores.device, dtype=dtype)
    softmax_any[(scores.numel() // m,)](scores, out, m, scale, BLOCK=min(block, triton.next_power_of_2(m)),
                                         num_warps=warps)
    return out




@triton.jit
def softmax_one_pass(s_ptr, o_ptr, M, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64) * M
    cols = tl.arange(0, BLOCK)
    v = tl.load(s_ptr + row + cols, mask=cols < M, other=float("-inf")).to(tl.float32) * scale
    e = tl.exp(v - tl.max(v, axis=0))
    tl.store(o_ptr + row + cols, (e / tl.sum(e, axis=0)).to(o_ptr.dtype.element_ty), mask=cols < M)


def soft1(scores, scale, dtype, warps):
    m = scores.shape[-1]
    out = torch.empty(scores.shape, device=scores.device, dtype=dtype)
    softmax_one_pass[(scores.numel() // m,)](scores, out, m, scale, BLOCK=triton.next_power_of_2(m), num_warps=warps)
    return out


def make(softmax, p_fp16):
    def fn(q, k, v, scale):
        b, n, h, d = q.shape
        m = k.shape[1]
        qh, kh, vh = (t.transpose(1, 2).reshape(b * h, -1, d).half() for t in (q, k, v))
        if not p_fp16:
            vh = v.transpose(1, 2).reshape(b * h, -1, d)
        kt = kh.transpose(1, 2)
        out = torch.empty(b * h, n, d, device=q.device, dtype=vh.dtype)
        rows = max(1, min(n, (512 << 20) // (2 * m * b * h)))
        for start in range(0, n, rows):
            scores = torch.baddbmm(torch.zeros(1, 1, 1, device=q.device, dtype=torch.float16), qh[:, start:start + rows],
                                   kt, beta=0, alpha=scale)
            probs = softmax(scores, vh.dtype)
            torch.bmm(probs, vh, out=out[:, start:start + rows])
        return out.to(q.dtype).view(b, h, n, d).transpose(1, 2)
    return fn


def reference(q, k, v, scale, rows=512):
    qf = q[:, :rows].float().transpose(1, 2)
    kf, vf = (t.float().transpose(1, 2) for t in (k, v))
    return torch.softmax(qf @ kf.transpose(-1, -2) * scale, -1) @ vf


rows = []
for n in (16384, 36864, 65536):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, n, 1, 512, device="cuda", generator=g).mul(1.5).to(torch.bfloat16) for _ in range(3))
    scale = 512 ** -0.5
    ref = reference(q, k, v, scale).transpose(1, 2)
    variants = {"matmul (main)": REGISTRY[AttentionBackend.MATMUL].fn,
                "fp16 S, bf16 P (two-pass)": make(lambda s, dt: soft(s, 1.0, dt), False),
                "fp16 S, fp16 P (two-pass)": make(lambda s, dt: soft(s, 1.0, dt), True)}
    for w in (8, 16, 32):
        variants[f"fp16 S, bf16 P (one-pass, {w} warps)"] = make(lambda s, dt, w=w: soft1(s, 1.0, dt, w), False)
        variants[f"fp16 S, fp16 P (one-pass, {w} warps)"] = make(lambda s, dt, w=w: soft1(s, 1.0, dt, w), True)
    for name, fn in variants.items():
        try:
            ms = gpu_ms(lambda: fn(q, k, v, scale), groups=7)
            o = fn(q, k, v, scale)[:, :512].float()
            err = ((o - ref).norm() / ref.norm()).item()
        except Exception as exc:  # noqa
            ms, err = None, repr(exc)[:300]
        rows.append({"tokens": n, "variant": name, "ms": ms, "rel_err": err}); print(rows[-1], flush=True)
    # parts of the fp16 path, whole (unblocked where it fits)
    qh, kh, vh = (t.transpose(1, 2).reshape(1, -1, 512).half() for t in (q, k, v))
    r = min(n, (512 << 20) // (2 * n))
    z = torch.zeros(1, 1, 1, device="cuda", dtype=torch.float16)
    s = torch.baddbmm(z, qh[:, :r], kh.transpose(1, 2), beta=0, alpha=scale)
    p = soft(s, 1.0, torch.bfloat16)
    parts = {"QK^T fp16 out (block)": lambda: torch.baddbmm(z, qh[:, :r], kh.transpose(1, 2), beta=0, alpha=scale),
             "QK^T fp32 out (block)": lambda: torch.bmm(qh[:, :r], kh.transpose(1, 2), out_dtype=torch.float32),
             "softmax two-pass (block)": lambda: soft(s, 1.0, torch.bfloat16),
             "softmax one-pass 16w (block)": lambda: soft1(s, 1.0, torch.bfloat16, 16),
             "PV bf16 (block)": lambda: torch.bmm(p, v.transpose(1, 2).reshape(1, -1, 512))}
    for name, fn in parts.items():
        try:
            ms = gpu_ms(fn, groups=7)
        except Exception as exc:  # noqa
            ms = repr(exc)[:300]
        rows.append({"tokens": n, "part": name, "rows": r, "ms": ms}); print(rows[-1], flush=True)
    del q, k, v, qh, kh, vh, s, p
    torch.cuda.empty_cache()
out_dir.mkdir(parents=True, exist_ok=True)
(out_dir / "probe2.json").write_text(json.dumps(rows, indent=1))

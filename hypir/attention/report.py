"""What ran, in the words of the console lines and the node status; and the text encoder's matching
transformers attention implementation."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..attention_names import AUTO, AttentionBackend
from .backends import FLASH_ORDER, REGISTRY, dtype_name
from .router import AttentionRouter

# ----------------------------------------------------------------------------------------------
# Text encoder: the matching transformers attention implementation.


def text_encoder_implementation(router: AttentionRouter) -> str:
    """transformers' attn_implementation for the CLIP text model under this router's policy. Its "sdpa" lets
    PyTorch pick a kernel, FlashAttention-class ones included (cuDNN, flash): with FlashAttention off, or a
    non-FlashAttention backend named, the 77-token text encoder runs "eager" attention instead (once per prompt:
    its embedding is cached)."""
    requested = router.policy.attention
    flash_allowed = (requested == AUTO and router.policy.use_flash_attention) or \
        (requested != AUTO and REGISTRY[requested].flash_class)
    if requested == AttentionBackend.SDPA:  # "PyTorch chooses", for the text encoder as for the UNet
        return "sdpa"
    if not flash_allowed or requested == AttentionBackend.STANDARD:
        return "eager"
    if requested in (AUTO, AttentionBackend.FLASH_ATTN) and router.why_not(AttentionBackend.FLASH_ATTN, 64) is None:
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():  # transformers' own check of the flash-attn 2 package
            return "flash_attention_2"
    return "sdpa"


# ----------------------------------------------------------------------------------------------
# Why FlashAttention did not run


def _flash_limits() -> tuple[tuple[int, int], set, int]:
    """What every FlashAttention-class kernel of the registry needs at the least: (lowest capability, dtypes,
    widest head_dim), for the one-line reasons a user reads."""
    specs = [REGISTRY[b] for b in FLASH_ORDER]
    return (min(s.min_capability for s in specs if s.min_capability), {d for s in specs for d in s.dtypes},
            max(s.max_head_dim for s in specs if s.max_head_dim))


def flash_off_reason(router: AttentionRouter, module_prefix: str = "unet.", head_dim: int = 64) -> str:
    """Why the modules under this prefix do not run a FlashAttention-class kernel, in the words a user needs."""
    failed = sorted({b.value for m, bs in router.failed.items() if m.startswith(module_prefix)
                     for b in bs if REGISTRY[b].flash_class})
    if failed:
        return f"{'/'.join(failed)} failed at run time"
    _, off_reason = router.candidates()
    if off_reason:
        return off_reason
    if router.policy.attention != AUTO:
        return f"{router.policy.attention.value} chosen"
    info = router.info
    lowest, dtypes, widest = _flash_limits()
    if info.type != "cuda":
        return f"{info.type.upper()}: FlashAttention needs an NVIDIA GPU"
    if info.capability and info.capability < lowest:
        below = f"below sm{lowest[0]}{lowest[1]}"
        return f"GPU {info.sm} ({info.name}) is {below}" if info.name else f"GPU {info.sm} is {below}"
    if router.dtype not in dtypes:
        names = " or ".join(sorted(map(dtype_name, dtypes), reverse=True))
        return f"{dtype_name(router.dtype)}: FlashAttention needs {names}"
    if head_dim > widest:
        return f"head_dim {head_dim} exceeds what FlashAttention kernels support"
    reasons = [f"{b.value}: {why}" for b in FLASH_ORDER if (why := router.why_not(b, head_dim))]
    return "; ".join(reasons) if reasons else "no FlashAttention kernel supports this shape"


# ----------------------------------------------------------------------------------------------
# Reports


@dataclass
class AttentionReport:
    """What ran, in the words of the console lines and the node status. FlashAttention counts as used for the
    UNet's self-attention modules (unet.*.attn1, the long sequences) that ran a FlashAttention-class kernel: all of
    them, some, or none."""

    unet_self: AttentionBackend | None  # the backend most UNet self-attention modules ran
    per_module: dict[str, AttentionBackend]
    text_encoder: str
    reason: str | None  # why FlashAttention is not used for (some of) the UNet self-attention
    warnings: list[str]
    # module -> (q tokens, kv tokens, heads, head_dim)
    shapes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    @property
    def self_attention(self) -> dict[str, AttentionBackend]:
        return {m: b for m, b in self.per_module.items() if m.startswith("unet.") and m.endswith("attn1")}

    def _flash_self(self) -> tuple[list[AttentionBackend], int, int]:
        """The FlashAttention-class kernels of the UNet's self-attention (most modules first), how many modules
        ran one, and how many modules there are."""
        ran = list(self.self_attention.values())
        flash = [b for b in ran if REGISTRY[b].flash_class]
        return sorted(set(flash), key=lambda b: (-flash.count(b), b.value)), len(flash), len(ran)

    @property
    def flash_enabled(self) -> bool:
        """Every UNet self-attention module ran a FlashAttention-class kernel."""
        _, used, total = self._flash_self()
        return total > 0 and used == total

    @property
    def flash_partly(self) -> bool:
        _, used, total = self._flash_self()
        return 0 < used < total

    def status_line(self) -> str:
        kernels, used, total = self._flash_self()
        named = " + ".join(f"{b.value} {REGISTRY[b].version()}" for b in kernels)
        if total and used == total:
            return f"FlashAttention: enabled ({named})"
        others = "+".join(sorted({b.value for b in self.self_attention.values() if not REGISTRY[b].flash_class}))
        if used:
            return (f"FlashAttention: partly enabled ({named} for {used} of {total} UNet self-attention modules, "
                    f"{others} for the rest: {self.reason})")
        return f"FlashAttention: disabled ({self.reason}), using {others or 'none'}"

    def backends_by_role(self) -> dict[str, str]:
        """Backend per kind of module: unet.attn1, unet.attn2, vae (joined when they differ)."""
        roles: dict[str, set[str]] = {}
        for module, backend in self.per_module.items():
            role = module.split(".")[0]
            if role == "unet":
                role = "unet." + ("attn2" if module.endswith("attn2") else "attn1")
            roles.setdefault(role, set()).add(backend.value)
        result = {role: "+".join(sorted(names)) for role, names in sorted(roles.items())}
        result["text_encoder"] = self.text_encoder
        return result

    def _unet_backends(self) -> list[AttentionBackend]:
        """The kernels the UNet ran, the main one first."""
        ran = {b for m, b in self.per_module.items() if m.startswith("unet.")}
        return sorted(ran, key=lambda b: (b != self.unet_self, b.value))

    def console_lines(self) -> list[str]:
        kernels, used, total = self._flash_self()
        unet = self._unet_backends()
        lines = []
        if AttentionBackend.FLASH_ATTN in self.per_module.values() or self.text_encoder == "flash_attention_2":
            # the documented line: whenever the flash-attn package runs any module
            lines.append(f"FlashAttention {REGISTRY[AttentionBackend.FLASH_ATTN].version()} is available and will be "
                         f"used for acceleration.")
        if not used:
            backend = "+".join(b.value for b in unet) or "none"
            lines.append(f"FlashAttention is not used ({self.reason}); attention runs on {backend}.")
        else:
            main = REGISTRY[kernels[0]]
            if not lines:
                lines.append(f"{main.label} {main.version()} is available and will be used for acceleration.")
            labels = " + ".join(REGISTRY[b].label for b in kernels)
            if used == total:
                lines.append(f"{labels} enabled for this enhancer.")
            else:
                lines.append(f"{labels} enabled for {used} of {total} UNet self-attention modules; the others run "
                             f"{'+'.join(sorted({b.value for b in self.self_attention.values() if b not in kernels}))} "
                             f"({self.reason}).")
        if self.text_encoder == "flash_attention_2":
            lines.append("FlashAttention 2 enabled for CLIPTextModel")
        else:
            lines.append(f"CLIPTextModel uses {self.text_encoder} attention"
                         + (" (transformers runs FlashAttention only through the flash-attn 2 package)" if used else ""))
        if used and len(unet) > 1:
            lines.append(" + ".join(REGISTRY[b].label for b in unet)
                         + " enabled for UNet2DConditionModel, chosen per attention shape")
        elif used:
            lines.append(f"{REGISTRY[unet[0]].label} enabled for UNet2DConditionModel")
        vae = {m: b for m, b in self.per_module.items() if m.startswith("vae.")}
        if vae and used:
            dims = sorted({self.shapes[m][3] for m in vae if m in self.shapes})
            dim = "/".join(map(str, dims)) or "?"
            beyond = ", beyond FlashAttention kernels" if dims and min(dims) > _flash_limits()[2] else ""
            lines.append(f"AutoencoderKL attention (head_dim {dim}{beyond}) runs on "
                         + "+".join(sorted({b.value for b in vae.values()})))
        return lines


def build_report(router: AttentionRouter, text_encoder: str) -> AttentionReport:
    unet_self = [b for m, b in router.ran.items() if m.startswith("unet.") and m.endswith("attn1")]
    main = max(sorted(set(unet_self), key=lambda b: b.value), key=unet_self.count) if unet_self else None
    report = AttentionReport(main, dict(router.ran), text_encoder, None, list(router.fallback_warnings),
                             dict(router.shapes))
    if not report.flash_enabled:
        report.reason = flash_off_reason(router, "unet.", 64)
    return report

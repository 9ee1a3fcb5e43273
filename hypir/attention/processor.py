"""The diffusers attention processor of every attention module of the UNet and VAE: diffusers' own
AttnProcessor2_0 step for step, with the attention product routed through the caller's router."""

from __future__ import annotations

import torch

from .backends import _sdpa
from .router import dispatch

class HYPIRAttnProcessor:
    """A diffusers attention processor that asks the active router for this module's backend.

    Follows diffusers' ``AttnProcessor2_0`` step for step (spatial/group norm, 4-D inputs of the VAE,
    residual, rescale), with the attention product itself routed through :func:`dispatch`.
    """

    def __init__(self, name: str):
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("HYPIR attention does not take an attention mask (HYPIR passes none)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channels, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        batch = query.shape[0]
        head_dim = key.shape[-1] // attn.heads
        query = query.view(batch, -1, attn.heads, head_dim)
        key = key.view(batch, -1, attn.heads, head_dim)
        value = value.view(batch, -1, attn.heads, head_dim)
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        if torch.compiler.is_compiling():  # a caller's torch.compile: it picks the SDPA kernel and fuses around it
            hidden_states = _sdpa(query, key, value, attn.scale)
        else:
            hidden_states = dispatch(self.name, query, key, value, attn.scale)
        hidden_states = hidden_states.reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)

        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch, channels, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def install_processors(model: torch.nn.Module, prefix: str) -> int:
    """Give every attention module of a diffusers model (UNet, VAE) a routed processor; returns the count."""
    processors = {name: HYPIRAttnProcessor(f"{prefix}.{name.removesuffix('.processor')}")
                  for name in model.attn_processors}
    model.set_attn_processor(processors)
    return len(processors)

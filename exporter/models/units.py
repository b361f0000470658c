"""The finest cut of each architecture into units with named tensor inputs and outputs.

Each wrapper calls the diffusers submodules exactly as the diffusers ``forward`` does, so running
the units in order reproduces ``model(...)`` (tests check max abs diff <= 1e-5). Tensor names:

UNet: ``sample``, ``timestep``, ``encoder_hidden_states`` in; ``temb`` (time embedding);
``skip{j}`` the down path's outputs in diffusers' ``down_block_res_samples`` order (``skip0`` is
conv_in's output; the last one feeds the mid block); ``mid``; ``up{b}_{i}`` / ``up{b}_upsample``;
``noise_pred`` out. DiT: ``sample``, ``timestep``, ``class_labels`` in; ``hidden{i}`` tokens after
``i`` transformer blocks; ``noise_pred`` out.
"""

from __future__ import annotations

import torch

from exporter.errors import ModelError
from exporter.models.blocks import Unit


class UNetStem(torch.nn.Module):
    """Time embedding (depends on t only) and conv_in."""

    def __init__(self, unet):
        super().__init__()
        self.time_proj, self.time_embedding, self.act, self.conv_in = (
            unet.time_proj, unet.time_embedding, unet.time_embed_act, unet.conv_in)
        self._get_time_embed = unet.get_time_embed
        self.text_time = unet.config.get("addition_embed_type") == "text_time"
        if self.text_time:  # SDXL: + embedding of the pooled text and the size/crop ids
            self.add_time_proj, self.add_embedding = unet.add_time_proj, unet.add_embedding

    def forward(self, sample, timestep, *added):
        emb = self.time_embedding(self._get_time_embed(sample=sample, timestep=timestep), None)
        if self.text_time:  # as diffusers' get_aug_embed does for text_time
            text_embeds, time_ids = added
            time_embeds = self.add_time_proj(time_ids.flatten()).reshape(text_embeds.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds.to(emb.dtype)], dim=-1))
        if self.act is not None:
            emb = self.act(emb)
        return self.conv_in(sample), emb


class UNet2DStem(torch.nn.Module):
    """``UNet2DModel``'s time embedding (+ class embedding when class-conditional) and conv_in."""

    def __init__(self, unet):
        super().__init__()
        self.time_proj, self.time_embedding, self.conv_in = unet.time_proj, unet.time_embedding, unet.conv_in
        self.class_embedding = unet.class_embedding
        self.class_via_time_proj = unet.config.class_embed_type == "timestep"

    def forward(self, sample, timestep, *class_labels):
        emb = self.time_embedding(self.time_proj(timestep).to(sample.dtype))
        if self.class_embedding is not None:
            labels = class_labels[0]
            if self.class_via_time_proj:
                labels = self.time_proj(labels)
            emb = emb + self.class_embedding(labels).to(sample.dtype)
        return self.conv_in(sample), emb


class ResnetLayer(torch.nn.Module):
    """One resnet (+ its transformer when the block has cross-attention); in up blocks the input
    is first concatenated with the skip feature, as diffusers' up blocks do."""

    def __init__(self, resnet, attention=None, concat_skip: bool = False, cross_attention: bool = True):
        super().__init__()
        self.resnet, self.attention, self.concat_skip = resnet, attention, concat_skip
        self.cross_attention = cross_attention  # Transformer2DModel (reads the conditioning) or self-Attention

    def forward(self, hidden, *rest):
        if self.concat_skip:
            skip, *rest = rest
            hidden = torch.cat([hidden, skip], dim=1)
        temb, *enc = rest
        hidden = self.resnet(hidden, temb)
        if self.attention is not None and self.cross_attention:
            hidden = self.attention(hidden, encoder_hidden_states=enc[0], return_dict=False)[0]
        elif self.attention is not None:
            hidden = self.attention(hidden)
        return (hidden,)


class Resample(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, hidden):
        return (self.module(hidden),)


class UNetMid(torch.nn.Module):
    def __init__(self, mid, cross_attention: bool):
        super().__init__()
        self.mid, self.cross_attention = mid, cross_attention

    def forward(self, hidden, temb, *enc):
        if self.cross_attention:
            return (self.mid(hidden, temb, encoder_hidden_states=enc[0]),)
        return (self.mid(hidden, temb),)


class UNetHead(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.norm, self.act, self.conv_out = unet.conv_norm_out, unet.conv_act, unet.conv_out

    def forward(self, hidden):
        if self.norm is not None:
            hidden = self.act(self.norm(hidden))
        return (self.conv_out(hidden),)


KNOWN_UNET_BLOCKS = {"DownBlock2D", "CrossAttnDownBlock2D", "AttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D",
                     "AttnUpBlock2D", "UNetMidBlock2D", "UNetMidBlock2DCrossAttn", "UNetMidBlock2DSimpleCrossAttn"}


def unet_units(unet, cross_attention: bool) -> list[Unit]:
    """Units of a diffusers UNet: ``UNet2DConditionModel`` (``cross_attention=True``: its
    transformers read ``encoder_hidden_states``) or ``UNet2DModel`` (self-attention blocks, optional
    class embedding read from ``class_labels``)."""
    cfg = unet.config
    if cross_attention:
        unsupported = {k: cfg.get(k) for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim",
                                               "num_class_embeds") if cfg.get(k)}
        added = ()
        if unsupported.get("addition_embed_type") == "text_time":  # SDXL
            del unsupported["addition_embed_type"]
            added = ("text_embeds", "time_ids")
        stem = Unit("stem", "stem", UNetStem(unet), ("sample", "timestep", *added), ("skip0", "temb"))
    else:
        unsupported = {k: cfg.get(k) for k in ("time_embedding_type", "downsample_type", "upsample_type")
                       if cfg.get(k) not in (None, "positional", "conv")}
        skip_blocks = [type(b).__name__ for b in [*unet.down_blocks, *unet.up_blocks] if "Skip" in type(b).__name__]
        if skip_blocks:
            unsupported["skip blocks"] = skip_blocks
        labels = ("class_labels",) if unet.class_embedding is not None else ()
        stem = Unit("stem", "stem", UNet2DStem(unet), ("sample", "timestep") + labels, ("skip0", "temb"))
    # block classes whose forward the layers below reproduce (others, e.g. ResnetDownsampleBlock2D, whose
    # resamplers read temb, or KDownBlock2D, are refused rather than run differently)
    other = [type(b).__name__ for b in [*unet.down_blocks, *unet.up_blocks, unet.mid_block]
             if b is not None and type(b).__name__ not in KNOWN_UNET_BLOCKS]
    if other:
        unsupported["block types"] = other
    if unsupported or cfg.get("center_input_sample"):
        raise ModelError(f"block partition does not support these UNet options yet: {unsupported or 'center_input_sample'}")

    def reads_text(block) -> bool:  # as diffusers decides: self-attention blocks (AttnDownBlock2D) do not
        return cross_attention and getattr(block, "has_cross_attention", False)

    enc = ("encoder_hidden_states",) if cross_attention else ()
    units = [stem]
    skips = ["skip0"]
    for b, block in enumerate(unet.down_blocks):
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        text = reads_text(block)
        for i, (resnet, attn) in enumerate(zip(block.resnets, attentions)):
            name = f"skip{len(skips)}"
            units.append(Unit(f"down{b}.layer{i}", f"down{b}", ResnetLayer(resnet, attn, cross_attention=text),
                              (skips[-1], "temb") + (enc if attn is not None and text else ()), (name,)))
            skips.append(name)
        for downsampler in block.downsamplers or []:
            name = f"skip{len(skips)}"
            units.append(Unit(f"down{b}.downsample", f"down{b}", Resample(downsampler), (skips[-1],), (name,)))
            skips.append(name)
    hidden = skips[-1]
    if unet.mid_block is not None:
        mid_attn = reads_text(unet.mid_block)
        units.append(Unit("mid", "mid", UNetMid(unet.mid_block, mid_attn),
                          (hidden, "temb") + (enc if mid_attn else ()), ("mid",)))
        hidden = "mid"
    for b, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
        text = reads_text(block)
        for i, (resnet, attn) in enumerate(zip(block.resnets, attentions)):
            skip = skips.pop()
            units.append(Unit(f"up{b}.layer{i}", f"up{b}",
                              ResnetLayer(resnet, attn, concat_skip=True, cross_attention=text),
                              (hidden, skip, "temb") + (enc if attn is not None and text else ()), (f"up{b}_{i}",)))
            hidden = f"up{b}_{i}"
        for upsampler in block.upsamplers or []:
            units.append(Unit(f"up{b}.upsample", f"up{b}", Resample(upsampler), (hidden,), (f"up{b}_upsample",)))
            hidden = f"up{b}_upsample"
    units.append(Unit("head", "head", UNetHead(unet), (hidden,), ("noise_pred",)))
    return units


def unpatchify(tokens: torch.Tensor, patch: int, channels: int) -> torch.Tensor:
    """[N, tokens, patch*patch*C] -> [N, C, H, W] for square latents, as diffusers' DiT heads do."""
    side = int(tokens.shape[1] ** 0.5)
    tokens = tokens.reshape(-1, side, side, patch, patch, channels)
    tokens = torch.einsum("nhwpqc->nchpwq", tokens)
    return tokens.reshape(-1, channels, side * patch, side * patch)


class DiTStem(torch.nn.Module):
    def __init__(self, dit):
        super().__init__()
        self.pos_embed = dit.pos_embed

    def forward(self, sample):
        return (self.pos_embed(sample),)


class DiTBlock(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden, timestep, class_labels):
        return (self.block(hidden, timestep=timestep, class_labels=class_labels),)


class DiTHead(torch.nn.Module):
    """adaLN output modulation (conditioning from block 0's embedding, as diffusers does) + unpatchify."""

    def __init__(self, dit):
        super().__init__()
        self.emb = dit.transformer_blocks[0].norm1.emb
        self.norm_out, self.proj_out_1, self.proj_out_2 = dit.norm_out, dit.proj_out_1, dit.proj_out_2
        self.patch, self.channels = dit.patch_size, dit.out_channels

    def forward(self, hidden, timestep, class_labels):
        cond = self.emb(timestep, class_labels, hidden_dtype=hidden.dtype)
        shift, scale = self.proj_out_1(torch.nn.functional.silu(cond)).chunk(2, dim=1)
        hidden = self.proj_out_2(self.norm_out(hidden) * (1 + scale[:, None]) + shift[:, None])
        return (unpatchify(hidden, self.patch, self.channels),)


def dit_units(dit) -> list[Unit]:
    units = [Unit("stem", "stem", DiTStem(dit), ("sample",), ("hidden0",))]
    for i, block in enumerate(dit.transformer_blocks):
        units.append(Unit(f"blocks.{i}", f"blocks.{i}", DiTBlock(block), (f"hidden{i}", "timestep", "class_labels"),
                          (f"hidden{i + 1}",)))
    units.append(Unit("head", "head", DiTHead(dit), (f"hidden{len(dit.transformer_blocks)}", "timestep",
                                                     "class_labels"), ("noise_pred",)))
    return units


def unet_split_shortcut_sites(unet) -> dict[str, int]:
    """Q-Diffusion's split-shortcut sites: ``{module name: channels of the up-path part}``.

    In diffusers up blocks each resnet reads ``cat([hidden, skip])``. Only its 1x1 ``conv_shortcut``
    sees that raw concatenation, whose two parts have very different ranges; ``conv1`` sees it
    through GroupNorm + SiLU, which renormalises it. So the shortcut's input is quantized as two
    tensors (channels ``[:split]`` and ``[split:]``) and its weight split the same way.
    """
    skips = [unet.conv_in.out_channels]
    for block in unet.down_blocks:
        skips += [resnet.out_channels for resnet in block.resnets]
        if block.downsamplers:
            skips.append(block.resnets[-1].out_channels)
    hidden = unet.mid_block.resnets[-1].out_channels if unet.mid_block is not None else skips[-1]
    sites = {}
    for b, block in enumerate(unet.up_blocks):
        for i, resnet in enumerate(block.resnets):
            skip = skips.pop()
            shortcut = resnet.conv_shortcut
            if shortcut is not None:
                if shortcut.in_channels != hidden + skip:  # a layout this code does not understand
                    raise ModelError(f"up_blocks.{b}.resnets.{i}.conv_shortcut reads {shortcut.in_channels} "
                                     f"channels, expected {hidden} + {skip}")
                sites[f"up_blocks.{b}.resnets.{i}.conv_shortcut"] = hidden
            hidden = resnet.out_channels
    return sites


class PixArtStem(torch.nn.Module):
    """Patch embedding, the adaLN-single timestep embedding (shared by all blocks) and the caption
    projection of the conditioning."""

    def __init__(self, pixart):
        super().__init__()
        self.pos_embed, self.adaln_single, self.caption_projection = (
            pixart.pos_embed, pixart.adaln_single, pixart.caption_projection)

    def forward(self, sample, timestep, encoder_hidden_states):
        batch = sample.shape[0]
        hidden = self.pos_embed(sample)
        added = {"resolution": None, "aspect_ratio": None}
        t_mod, embedded_timestep = self.adaln_single(timestep, added, batch_size=batch, hidden_dtype=hidden.dtype)
        context = encoder_hidden_states
        if self.caption_projection is not None:
            context = self.caption_projection(context).view(batch, -1, hidden.shape[-1])
        return hidden, t_mod, embedded_timestep, context


class PixArtBlock(torch.nn.Module):
    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, hidden, context, t_mod):
        return (self.block(hidden, encoder_hidden_states=context, timestep=t_mod),)


class PixArtHead(torch.nn.Module):
    def __init__(self, pixart):
        super().__init__()
        self.scale_shift_table, self.norm_out, self.proj_out = (
            pixart.scale_shift_table, pixart.norm_out, pixart.proj_out)
        self.patch, self.channels = pixart.config.patch_size, pixart.out_channels

    def forward(self, hidden, embedded_timestep):
        shift, scale = (self.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        hidden = self.proj_out(self.norm_out(hidden) * (1 + scale) + shift).squeeze(1)
        return (unpatchify(hidden, self.patch, self.channels),)


def pixart_units(pixart) -> list[Unit]:
    if pixart.use_additional_conditions:
        raise ModelError("block partition of PixArt with resolution/aspect-ratio conditioning is not supported yet")
    units = [Unit("stem", "stem", PixArtStem(pixart), ("sample", "timestep", "encoder_hidden_states"),
                  ("hidden0", "adaln_timestep", "embedded_timestep", "context"))]
    for i, block in enumerate(pixart.transformer_blocks):
        units.append(Unit(f"blocks.{i}", f"blocks.{i}", PixArtBlock(block),
                          (f"hidden{i}", "context", "adaln_timestep"), (f"hidden{i + 1}",)))
    units.append(Unit("head", "head", PixArtHead(pixart), (f"hidden{len(pixart.transformer_blocks)}",
                                                           "embedded_timestep"), ("noise_pred",)))
    return units

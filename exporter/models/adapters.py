"""Architecture adapters: one per diffusers model class, registered by class name.

An adapter holds every architecture quirk, so generic code (sampling now; calibration, export and
the runtime later) never branches on the model class. Today it declares how the model is
conditioned and how one denoiser call is made; the block partition joins it with calibration.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch

from exporter.errors import ModelError, UsageError

ConditioningKind = Literal["embeddings", "class_labels", "none"]

_REGISTRY: dict[str, type[ArchitectureAdapter]] = {}


def register(cls: type[ArchitectureAdapter]) -> type[ArchitectureAdapter]:
    _REGISTRY[cls.class_name] = cls
    return cls


def supported_classes() -> list[str]:
    return sorted(_REGISTRY)


def adapter_for(class_name: str, config: dict) -> ArchitectureAdapter:
    if class_name not in _REGISTRY:
        raise ModelError(f"model class {class_name!r} is not supported; supported: {', '.join(supported_classes())}")
    return _REGISTRY[class_name](config)


# Checkpoints saved before diffusers split its transformer classes name the generic class; diffusers
# picks the class by norm_type when loading them (models/model_loading_utils.py), and so do we: the
# published DiT-XL-2 and PixArt-alpha checkpoints say Transformer2DModel.
LEGACY_CLASSES = {"Transformer2DModel": ("norm_type", {"ada_norm_zero": "DiTTransformer2DModel",
                                                       "ada_norm_single": "PixArtTransformer2DModel"})}


def model_class_of(config: dict) -> str | None:
    """The class a config's model loads as: its ``_class_name``, or what diffusers remaps a legacy one to."""
    class_name = config.get("_class_name")
    if class_name in LEGACY_CLASSES:
        key, classes = LEGACY_CLASSES[class_name]
        if config.get(key) not in classes:
            raise ModelError(f"{class_name} with {key} {config.get(key)!r} is not supported; supported: "
                             f"{', '.join(supported_classes())} (a {class_name} with {key} "
                             f"{' or '.join(classes)} loads as {' or '.join(classes.values())})")
        return classes[config[key]]
    return class_name


class ArchitectureAdapter:
    class_name: ClassVar[str]
    subfolder: ClassVar[str]  # where a diffusers pipeline directory keeps this model

    def __init__(self, config: dict):
        self.config = config
        # the shape every sampler, calibration and export starts from: refused here if the config
        # cannot give it, not as a TypeError at the first sample (diffusers' UNets default to None)
        size, channels = config.get("sample_size"), config.get("in_channels")
        sizes = [size] if isinstance(size, int) else size if isinstance(size, list) and len(size) == 2 else [None]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in sizes):
            raise ModelError(f"{self.class_name} config has sample_size {size!r}: set it in config.json to the "
                             "latent size the model was trained at (an int, or [height, width])")
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 1:
            raise ModelError(f"{self.class_name} config has in_channels {channels!r}: set it in config.json")

    @property
    def conditioning(self) -> ConditioningKind:
        raise NotImplementedError

    @property
    def embedding_dim(self) -> int | None:
        """Width of the conditioning embeddings the model expects (kind ``embeddings``)."""
        return None

    @property
    def num_classes(self) -> int | None:
        """Number of real classes (kind ``class_labels``): labels lie in [0, num_classes)."""
        return None

    @property
    def null_classes(self) -> range | None:
        """The rows of the class table a conditioning file's ``null_class`` may name (kind ``class_labels``)."""
        return None

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        size = self.config["sample_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.config["in_channels"], h, w)

    def trace_sample_shape(self, model: torch.nn.Module) -> tuple[int, int, int]:
        """The latent shape blocks are traced at for export: the model's own, where the graphs'
        token count or position embedding is fixed at export (transformers)."""
        return self.sample_shape

    def latent_multiple(self, model: torch.nn.Module) -> int | None:
        """What a latent's height and width must be multiples of for this model; None: its own size
        only (transformers: their graphs fix the token count and position embedding, and diffusers'
        DiT turns its tokens back into a square image)."""
        return None

    def sample_shape_at(self, model: torch.nn.Module, latent) -> tuple[int, int, int]:
        """The sample shape for a latent (height, width) (None: the model's own), or a UsageError
        saying which sizes this model takes."""
        channels, h, w = self.sample_shape
        if latent is None or tuple(latent) == (h, w):
            return (channels, h, w)
        multiple = self.latent_multiple(model)
        if multiple is None:
            raise UsageError(f"latent {latent[0]}x{latent[1]}: {self.class_name} models run at their own latent "
                             f"size only ({h}x{w})")
        if min(latent) < 1 or latent[0] % multiple or latent[1] % multiple:
            raise UsageError(f"latent {latent[0]}x{latent[1]}: this {self.class_name} takes positive heights and "
                             f"widths that are multiples of {multiple}")
        return (channels, int(latent[0]), int(latent[1]))

    def denoise(self, model: torch.nn.Module, sample: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The model's noise prediction for ``sample`` at timesteps ``t`` (one per batch item)."""
        raise NotImplementedError

    def units(self, model: torch.nn.Module) -> list:
        """The model cut into its finest units (see ``exporter.models.units``)."""
        raise ModelError(f"block partition of {self.class_name} is not implemented yet")

    def named_inputs(self, sample: torch.Tensor, t: torch.Tensor, cond) -> dict[str, torch.Tensor]:
        """Model inputs under the tensor names the units use."""
        raise ModelError(f"block partition of {self.class_name} is not implemented yet")

    def split_shortcut_sites(self, model: torch.nn.Module) -> dict[str, int]:
        """Layers reading a concatenation of two differently ranged tensors: {module name: split
        channel}. None for architectures without skip concatenation."""
        return {}

    # Layers kept in high precision unless a recipe says otherwise: (module-name glob, reason).
    default_exclusions: ClassVar[tuple[tuple[str, str], ...]] = ()
    # Layers quantized weight-only (INT8 weights, float input) unless a recipe says otherwise: the
    # time-embedding and modulation layers, whose input depends on t (and the class) only.
    default_weight_only: ClassVar[tuple[tuple[str, str], ...]] = ()

    def cacheable_features(self, blocks: list) -> list[str]:
        """Tensors a feature cache may reuse across steps (the deep features of DeepCache)."""
        return []

    def cache_split(self, model: torch.nn.Module) -> tuple[str, ...]:
        """Blocks exported cut into layers, so the shallowest cache branch skips all it can."""
        return ()

    def blocks(self, model: torch.nn.Module, split=()) -> list:
        """The model as blocks (one per diffusers block; those in ``split`` cut into layers)."""
        from exporter.models.blocks import partition

        return partition(self.units(model), ("noise_pred",), split)

    def postprocess(self, noise_pred: torch.Tensor) -> torch.Tensor:
        """From the model's raw output (the blocks' ``noise_pred``) to the epsilon samplers use."""
        return self._drop_learned_sigma(noise_pred)

    def _drop_learned_sigma(self, out: torch.Tensor) -> torch.Tensor:
        # DiTs and some UNets (learned variance) predict [epsilon, variance]; samplers here use epsilon.
        channels = self.config["in_channels"]
        return out[:, :channels] if out.shape[1] == 2 * channels else out


# Why time-dependent layers get INT8 weights but a float input: an input that depends on t only is
# computed once per t, so its quantization error is not averaged out over the image (TFMQ-DM). Their
# INT8 weights cost at most 0.05 dB at INT8 and W4A16, 0.25 dB at W4A8 and 0.15-0.46 dB at FP8 on
# the reference models (docs/quantization.md, "Time-dependent layers"), while float weights made the DiT's INT8
# graphs 63 % of FP32: adaLN-Zero modulation is a third of a DiT's parameters (DiT-XL/2: 223 M of
# 675 M), the time layers 28 M of SD 1.5's 860 M.
TIME_INPUT = "input depends on t only: its quantization error is not averaged out (TFMQ-DM); INT8 weights"
UNET_WEIGHT_ONLY = (
    ("time_embedding.*", f"time embedding: {TIME_INPUT}"),
    ("*.time_emb_proj", f"time-embedding projection: {TIME_INPUT}"),
)
UNET_EXCLUSIONS = (
    ("conv_in", "first layer: few input channels, no speed-up, large relative error"),
    ("conv_out", "last layer: its error goes straight into the predicted noise"),
)


class UNetFamily(ArchitectureAdapter):
    """What every diffusers UNet shares: skip concatenation (split shortcut), DeepCache features."""

    subfolder = "unet"
    cross_attention: ClassVar[bool]
    default_exclusions = UNET_EXCLUSIONS
    default_weight_only = UNET_WEIGHT_ONLY

    def __init__(self, config: dict):
        super().__init__(config)
        # the sampler feeds the predicted noise back as the next input: an inpainting or instruct-pix2pix
        # UNet (in 9 or 8 channels, out 4) reads a masked or source image no conditioning file here carries
        channels, out = config["in_channels"], config.get("out_channels", config["in_channels"])
        if out not in (channels, 2 * channels):
            raise ModelError(f"{self.class_name} with in_channels {channels} and out_channels {out} is not supported: "
                             "its extra input channels (an inpainting mask, a source image) have no conditioning "
                             "here; the output must have the input's channels (or twice, with learned variance)")

    def units(self, model):
        from exporter.models.units import unet_units

        _, h, w = self.sample_shape
        multiple = self.latent_multiple(model)
        if h % multiple or w % multiple:  # diffusers pads such sizes through upsample_size; the blocks do not
            raise ModelError(f"{self.class_name} of sample size {h}x{w}: the block partition needs sizes its "
                             f"{multiple.bit_length() - 1} downsamplings halve exactly (multiples of {multiple})")
        return unet_units(model, cross_attention=self.cross_attention)

    def split_shortcut_sites(self, model):
        from exporter.models.units import unet_split_shortcut_sites

        return unet_split_shortcut_sites(model)

    def trace_sample_shape(self, model):
        # UNet graphs are dynamic in height and width, so the smallest latent every downsampling
        # divides (the deepest level 2 x 2) traces the same graph as the model's own size, at a
        # fraction of the cost: tracing runs each block once in the graph's type, and PyTorch's
        # float16 CPU convolutions are slow (a 320-channel 3x3 one over 2 x 32 x 32: 4.1 s, 0.02 s in
        # float32), more so the larger the image (docs/deployment.md, "Tracing at the smallest latent").
        smallest = 2 * self.latent_multiple(model)
        channels, h, w = self.sample_shape
        return (channels, min(h, smallest), min(w, smallest))

    def latent_multiple(self, model):
        # each downsampling halves the feature map, and the up path must meet every skip's size
        return 2 ** sum(1 for block in model.down_blocks if getattr(block, "downsamplers", None))

    def cache_split(self, model):
        # DeepCache's shallowest branch keeps only the first down layer and the last up layer live
        return ("down0", f"up{len(model.up_blocks) - 1}")

    def cacheable_features(self, blocks):
        # DeepCache: the up path's hidden input of each up block (or up layer when split)
        return [b.inputs[0] for b in blocks if b.name.startswith("up")]


class TransformerFamily(ArchitectureAdapter):
    """What DiT-style transformers share: token-stream caching."""

    subfolder = "transformer"

    def __init__(self, config: dict):
        super().__init__(config)
        _, h, w = self.sample_shape
        patch = config.get("patch_size", 2)
        if h % patch or w % patch:  # diffusers would cut the image into patches and return a smaller one
            raise ModelError(f"{self.class_name} of sample size {h}x{w} with patch_size {patch}: the size must be a "
                             "multiple of the patch size")

    def cacheable_features(self, blocks):
        # the token stream entering each transformer block, reused whole: a cached step runs only the
        # blocks after it and the head, so (unlike a UNet's, whose stem and skips read the current
        # input) it does not read the current latents at all. FORA and learning-to-cache reuse each
        # block's residual update instead, with the stem still run; that is not what this does.
        return [b.inputs[0] for b in blocks if b.name.startswith("blocks.")]


@register
class UNet2DConditionAdapter(UNetFamily):
    class_name = "UNet2DConditionModel"
    conditioning = "embeddings"
    cross_attention = True
    default_weight_only = UNET_WEIGHT_ONLY + (
        ("add_embedding.*", ("SDXL's pooled-text and size embedding: once per call, joins the time embedding; "
                             "INT8 weights")),
    )

    def __init__(self, config: dict):
        super().__init__(config)
        # conditioning a file of embeddings cannot carry (class labels, image embeddings): refused here,
        # not as a diffusers traceback in the first denoising step
        unsupported = {k: config[k] for k in ("class_embed_type", "num_class_embeds") if config.get(k) is not None}
        if config.get("addition_embed_type") not in (None, "text_time"):
            unsupported["addition_embed_type"] = config["addition_embed_type"]
        if config.get("encoder_hid_dim_type") not in (None, "text_proj"):
            unsupported["encoder_hid_dim_type"] = config["encoder_hid_dim_type"]
        widths = config.get("cross_attention_dim", 1280)  # diffusers' default
        if isinstance(widths, (list, tuple)) and len(set(widths)) > 1 and not config.get("encoder_hid_dim"):
            unsupported["cross_attention_dim"] = widths  # one embeddings tensor cannot be two widths
        if unsupported:
            raise ModelError(f"UNet2DConditionModel with {unsupported} is not supported: conditioning here is text "
                             "embeddings (cond/uncond) of one width, plus SDXL's text_embeds/time_ids "
                             "(addition_embed_type text_time)")

    @property
    def embedding_dim(self) -> int:
        # with encoder_hid_dim the model projects embeddings of that width to cross_attention_dim itself
        return self.config.get("encoder_hid_dim") or _one_width(self.config.get("cross_attention_dim", 1280))

    @property
    def pooled_text(self) -> bool:
        """SDXL's added conditioning: pooled text embedding + size/crop ids (``text_time``)."""
        return self.config.get("addition_embed_type") == "text_time"

    @property
    def added_widths(self) -> tuple[int, int] | None:
        """SDXL: (features the add embedding reads, features per time id): ``text_embeds`` of P features
        and k ``time_ids`` must give P + k x the second = the first."""
        total, per_id = self.config.get("projection_class_embeddings_input_dim"), self.config.get("addition_time_embed_dim")
        return None if total is None or per_id is None else (total, per_id)

    def denoise(self, model, sample, t, cond):
        if isinstance(cond, dict):  # SDXL: the pooled text and the size ids ride along
            added = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
            return self.postprocess(model(sample, t, encoder_hidden_states=cond["encoder_hidden_states"],
                                          added_cond_kwargs=added, return_dict=False)[0])
        return self.postprocess(model(sample, t, encoder_hidden_states=cond, return_dict=False)[0])

    def named_inputs(self, sample, t, cond):
        if isinstance(cond, dict):
            return {"sample": sample, "timestep": t, **cond}
        return {"sample": sample, "timestep": t, "encoder_hidden_states": cond}


def _one_width(width) -> int:
    """cross_attention_dim may be given per block; one embeddings tensor feeds them all (checked at init)."""
    return width[0] if isinstance(width, (list, tuple)) else width


@register
class UNet2DAdapter(UNetFamily):
    class_name = "UNet2DModel"
    cross_attention = False
    default_exclusions = UNET_EXCLUSIONS + (
        ("class_embedding", "class embedding: a table lookup, nothing to accelerate"),
    )

    def __init__(self, config: dict):
        super().__init__(config)
        if config.get("class_embed_type") is not None:  # labels projected as timesteps, or given as vectors
            raise ModelError(f"UNet2DModel with class_embed_type {config['class_embed_type']!r} is not supported: "
                             "class conditioning here is integer labels into a num_class_embeds table")

    @property
    def conditioning(self) -> ConditioningKind:
        return "class_labels" if self.config.get("num_class_embeds") else "none"

    @property
    def num_classes(self) -> int | None:
        return self.config.get("num_class_embeds")

    @property
    def null_classes(self) -> range | None:
        # nn.Embedding(num_class_embeds): no row of its own for the null class, so guidance needs a model
        # trained with one of its classes as "no class"; the file names it
        return range(self.config["num_class_embeds"]) if self.config.get("num_class_embeds") else None

    def sample_shape_at(self, model, latent):
        # unlike UNet2DConditionModel, diffusers' UNet2DModel passes no upsample_size: it cannot run
        # a size its downsamplings do not halve exactly, so that is refused before any sampling
        shape = super().sample_shape_at(model, latent)
        multiple = self.latent_multiple(model)
        if shape[1] % multiple or shape[2] % multiple:
            raise ModelError(f"UNet2DModel of sample size {shape[1]}x{shape[2]}: diffusers runs it only at sizes its "
                             f"downsamplings halve exactly (multiples of {multiple})")
        return shape

    def denoise(self, model, sample, t, cond):
        return self.postprocess(model(sample, t, class_labels=cond, return_dict=False)[0])

    def named_inputs(self, sample, t, cond):
        inputs = {"sample": sample, "timestep": t}
        if cond is not None:
            inputs["class_labels"] = cond
        return inputs


@register
class DiTAdapter(TransformerFamily):
    class_name = "DiTTransformer2DModel"
    conditioning = "class_labels"
    default_exclusions = (
        ("pos_embed.*", "patch embedding: few input channels, first layer"),
        ("proj_out_2", "last layer: its error goes straight into the predicted noise"),
    )
    default_weight_only = (
        ("transformer_blocks.*.norm1.emb.*", ("timestep/label embedding: input depends on t and the class only; "
                                              "INT8 weights")),
        ("transformer_blocks.*.norm1.linear", f"adaLN-Zero modulation (scales and gates every block): {TIME_INPUT}"),
        ("proj_out_1", f"output adaLN modulation: {TIME_INPUT}"),
    )

    @property
    def num_classes(self) -> int:
        return self.config["num_embeds_ada_norm"]

    @property
    def null_classes(self) -> range:
        # diffusers' LabelEmbedding keeps one extra row, index num_classes, for classifier-free guidance
        return range(self.num_classes, self.num_classes + 1)

    def denoise(self, model, sample, t, cond):
        return self.postprocess(model(sample, t, class_labels=cond, return_dict=False)[0])

    def units(self, model):
        from exporter.models.units import dit_units

        return dit_units(model)

    def named_inputs(self, sample, t, cond):
        return {"sample": sample, "timestep": t, "class_labels": cond}


@register
class PixArtAdapter(TransformerFamily):
    class_name = "PixArtTransformer2DModel"
    conditioning = "embeddings"
    default_exclusions = (
        ("pos_embed.*", "patch embedding: few input channels, first layer"),
        ("proj_out", "last layer: its error goes straight into the predicted noise"),
    )
    default_weight_only = (
        ("adaln_single.*", f"adaLN-single timestep embedding and modulation: {TIME_INPUT}"),
    )

    def __init__(self, config: dict):
        super().__init__(config)
        additional = config.get("use_additional_conditions")
        if additional or (additional is None and config.get("sample_size") == 128):  # diffusers' own default
            raise ModelError("PixArtTransformer2DModel with resolution/aspect-ratio conditioning "
                             "(use_additional_conditions, on by default at sample_size 128) is not supported yet")

    @property
    def embedding_dim(self) -> int:
        return self.config["caption_channels"]

    def denoise(self, model, sample, t, cond):
        added = {"resolution": None, "aspect_ratio": None}  # micro-conditioning is off (refused at load)
        out = model(sample, encoder_hidden_states=cond, timestep=t, added_cond_kwargs=added, return_dict=False)[0]
        return self.postprocess(out)

    def units(self, model):
        from exporter.models.units import pixart_units

        return pixart_units(model)

    def named_inputs(self, sample, t, cond):
        return {"sample": sample, "timestep": t, "encoder_hidden_states": cond}

"""TensorRT optimization profiles from the recipe's ``build:`` section and the graphs' manifest.

Every block input has a manifest shape whose dynamic dimensions are named (``batch``,
``<tensor>_height``, ``<tensor>_width``) and its ``trace_shape``, the size for a batch of 2 at the
model's own latent size. A dimension named ``batch`` scales with the number of images per call
(twice that when classifier-free guidance runs batched); a height or width scales with the latent's.
So each input's (min, opt, max) shape follows from three numbers per axis, for any block.
"""

from __future__ import annotations

from exporter.errors import UsageError
from exporter.export.manifest import resizable, scaled_size
from exporter.recipe import BuildSpec


def latent_sizes(manifest: dict, spec: BuildSpec) -> list[tuple[int, int]]:
    """(min, opt, max) latent (height, width); the model's own size when the recipe gives none."""
    native = tuple(manifest["sample_shape"][1:])
    if spec.latent is None:
        return [native] * 3
    sizes = [tuple(hw) for hw in spec.latent]
    if sizes != [native] * 3 and not resizable(manifest):
        # a transformer's token count and position embedding are fixed in its graphs
        raise UsageError(f"{manifest['source']['model_class']} graphs are exported for latent {list(native)} only; "
                         "remove build.latent from the recipe or re-export at the size you need")
    return sizes


def batch_sizes(spec: BuildSpec) -> list[int]:
    factor = 2 if spec.cfg else 1
    return [n * factor for n in spec.images]


def input_profile(tensor: dict, batches: list[int], latents: list[tuple[int, int]],
                  native: tuple[int, int]) -> list[tuple[int, ...]]:
    """(min, opt, max) shapes of one block input."""
    if "trace_shape" not in tensor:
        raise UsageError(f"the manifest has no traced shape for {tensor['name']}: re-export the graphs with "
                         "this version of the exporter")
    shapes = []
    for level in range(3):
        shape = []
        for dim, traced in zip(tensor["shape"], tensor["trace_shape"]):
            if isinstance(dim, int):
                shape.append(dim)
            elif dim == "batch":
                shape.append(batches[level])
            else:
                shape.append(scaled_size(tensor, dim, traced, latents[level], native))
        shapes.append(tuple(shape))
    return shapes


def block_profiles(manifest: dict, spec: BuildSpec) -> dict[str, dict[str, list[tuple[int, ...]]]]:
    """{block name: {input name: [min, opt, max] shape}} for every block of the manifest."""
    latents = latent_sizes(manifest, spec)
    batches = batch_sizes(spec)
    native = tuple(manifest["sample_shape"][1:])
    return {block["name"]: {t["name"]: input_profile(t, batches, latents, native) for t in block["inputs"]}
            for block in manifest["blocks"]}

"""Precomputed conditioning: what a text encoder or a label table produces, stored as safetensors.

Two layouts, picked by the model's adapter:

* ``embeddings`` (cross-attention models): ``cond`` [N, seq, dim], one row per prompt, and ``uncond``
  [1, seq, dim], the null prompt for classifier-free guidance.
* ``class_labels`` (class-conditional models): ``class_labels`` [N] int64 and ``null_class`` [1].

SDXL-style UNets (``addition_embed_type: text_time``) also read ``text_embeds`` [N, P] with
``uncond_text_embeds`` [1, P] (the pooled text embedding) and ``time_ids`` [N or 1, k] (original
size, crop, target size; the null half of guidance uses the same row's); their batches are dicts of
the three model inputs.

Row ``i`` of the file is what ``--rows i`` selects. Unconditional models need no file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from exporter.errors import ConditioningError, UsageError
from exporter.models.adapters import ArchitectureAdapter


@dataclass(frozen=True)
class Conditioning:
    kind: str
    cond: torch.Tensor | None  # [N, seq, dim] float or [N] int64; None when unconditional
    uncond: torch.Tensor | None  # [1, seq, dim] or [1]
    source: Path | None = None
    # further model inputs: name -> (per row [N, ...] or shared [1, ...], null-conditioning [1, ...])
    extra: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @property
    def num_rows(self) -> int | None:
        return None if self.cond is None else int(self.cond.shape[0])

    def check_rows(self, rows: list[int]) -> None:
        bad = [r for r in rows if r < 0 or (self.num_rows is not None and r >= self.num_rows)]
        if bad:
            where = f"{self.source} has {self.num_rows} rows" if self.source else "rows must be >= 0"
            raise UsageError(f"row(s) {bad} out of range: {where}")

    def batch(self, rows: list[int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Conditioning for a batch of images of the given rows, and the matching null batch."""
        if self.cond is None:
            return None, None
        index = torch.tensor(rows, dtype=torch.long)
        uncond = self.uncond.expand(len(rows), *self.uncond.shape[1:])
        if not self.extra:
            return self.cond[index], uncond

        def rows_of(x):
            return x[index] if x.shape[0] > 1 else x.expand(len(rows), *x.shape[1:])

        cond_batch, uncond_batch = {EMBEDDINGS: self.cond[index]}, {EMBEDDINGS: uncond}
        for name, (values, null) in self.extra.items():
            cond_batch[name], uncond_batch[name] = rows_of(values), rows_of(null)
        return cond_batch, uncond_batch


EMBEDDINGS = "encoder_hidden_states"


def cfg_batch(uncond, cond):
    """The classifier-free-guidance batch [null; conditional], for tensors or dicts of tensors."""
    if isinstance(cond, dict):
        return {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    return torch.cat([uncond, cond])


def load_conditioning(path: Path | None, adapter: ArchitectureAdapter) -> Conditioning:
    kind = adapter.conditioning
    if kind == "none":
        if path is not None:  # it would be recorded as the run's conditioning and never read
            raise ConditioningError(f"{path}: this {adapter.class_name} is unconditional; it takes no conditioning "
                                    "file (leave out --cond)")
        return Conditioning(kind, None, None, None)
    if path is None:
        raise ConditioningError(
            f"{adapter.class_name} needs conditioning: pass --cond FILE (a safetensors file with "
            + ("'cond' and 'uncond' embeddings)" if kind == "embeddings" else "'class_labels' and 'null_class')")
        )
    tensors = _read(Path(path))
    if kind == "embeddings":
        cond, uncond = _require(tensors, path, "cond", "uncond")
        if cond.ndim != 3 or cond.shape[0] == 0 or uncond.shape != (1, *cond.shape[1:]):
            raise ConditioningError(
                f"{path}: 'cond' must be [N, seq, dim] and 'uncond' [1, seq, dim]; "
                f"got {tuple(cond.shape)} and {tuple(uncond.shape)}"
            )
        if not cond.is_floating_point() or not uncond.is_floating_point():
            raise ConditioningError(f"{path}: 'cond' and 'uncond' must be floating point")
        if adapter.embedding_dim is not None and cond.shape[-1] != adapter.embedding_dim:
            raise ConditioningError(
                f"{path}: embeddings are {cond.shape[-1]} wide but the model expects {adapter.embedding_dim}"
            )
        extra = {}
        if getattr(adapter, "pooled_text", False):
            text, null_text, time_ids = _require(tensors, path, "text_embeds", "uncond_text_embeds", "time_ids")
            if text.ndim != 2 or text.shape[0] != cond.shape[0] or null_text.shape != (1, text.shape[1]) \
                    or time_ids.ndim != 2 or time_ids.shape[0] not in (1, cond.shape[0]):
                raise ConditioningError(
                    f"{path}: 'text_embeds' must be [N, P], 'uncond_text_embeds' [1, P] and 'time_ids' [N or 1, k] "
                    f"with N = {cond.shape[0]}; got {tuple(text.shape)}, {tuple(null_text.shape)}, "
                    f"{tuple(time_ids.shape)}")
            if not (text.is_floating_point() and null_text.is_floating_point() and time_ids.is_floating_point()):
                raise ConditioningError(f"{path}: 'text_embeds', 'uncond_text_embeds' and 'time_ids' must be "
                                        "floating point")
            widths = adapter.added_widths
            if widths is not None and text.shape[1] + time_ids.shape[1] * widths[1] != widths[0]:
                raise ConditioningError(
                    f"{path}: 'text_embeds' of {text.shape[1]} features and {time_ids.shape[1]} 'time_ids' give "
                    f"{text.shape[1] + time_ids.shape[1] * widths[1]} features ({text.shape[1]} + "
                    f"{time_ids.shape[1]} x {widths[1]}), but the model's add embedding reads {widths[0]} "
                    "(projection_class_embeddings_input_dim)")
            # the null half keeps each row's own sizes, as diffusers' SDXL pipeline does
            # (negative_add_time_ids = add_time_ids): guidance then amplifies only the text
            extra = {"text_embeds": (text.float(), null_text.float()),
                     "time_ids": (time_ids.float(), time_ids.float())}
        return Conditioning(kind, cond.float(), uncond.float(), Path(path), extra)
    labels, null = _require(tensors, path, "class_labels", "null_class")
    if labels.ndim != 1 or null.shape != (1,) or labels.is_floating_point() or null.is_floating_point():
        raise ConditioningError(f"{path}: 'class_labels' must be integer [N] and 'null_class' integer [1]")
    if labels.numel() == 0:
        raise ConditioningError(f"{path}: 'class_labels' is empty")
    limit = adapter.num_classes
    if limit is not None and (int(labels.max()) >= limit or int(labels.min()) < 0):
        raise ConditioningError(f"{path}: class labels must lie in [0, {limit}) for this model")
    allowed = adapter.null_classes
    if allowed is not None and int(null[0]) not in allowed:
        raise ConditioningError(
            f"{path}: 'null_class' {int(null[0])} is not the model's null class (" + (
                f"index {allowed[0]}: the extra row of its class table)" if len(allowed) == 1
                else f"a row of its class table, in [0, {len(allowed)}))"))
    return Conditioning(kind, labels.long(), null.long(), Path(path))


def _read(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise ConditioningError(f"conditioning file not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConditioningError(f"{path}: not a readable safetensors file ({e})") from None


def _require(tensors: dict, path, *keys: str) -> list[torch.Tensor]:
    missing = [k for k in keys if k not in tensors]
    if missing:
        raise ConditioningError(f"{path}: missing tensor(s) {missing}; found {sorted(tensors)}")
    for key in keys:  # NaN/Inf would pass QuantizeLinear as finite numbers: wrong images, no error
        value = tensors[key]
        if value.is_floating_point() and not torch.isfinite(value).all():
            rows = sorted({int(i) for i in (~torch.isfinite(value)).nonzero()[:, 0]})
            raise ConditioningError(f"{path}: '{key}' holds NaN/Inf (in row(s) {rows[:10]}); "
                                    "recompute the embeddings")
    return [tensors[k] for k in keys]



def resolve_guidance(guidance: float | None, default: float, conditioning: Conditioning,
                     adapter: ArchitectureAdapter) -> float:
    """The guidance scale of a run: ``guidance`` if given, else the model's ``default``. An
    unconditional model has nothing to guide by: a scale above 1 asked of it is refused, and its
    default is 1, so the run's record says what ran."""
    if conditioning.kind != "none":
        return default if guidance is None else guidance
    if guidance is not None and guidance > 1.0:
        raise ConditioningError(f"guidance {guidance:g}: this {adapter.class_name} is unconditional, so there is "
                                "nothing to guide by (leave out --guidance)")
    return 1.0 if guidance is None else guidance

"""Blocks: the unit of calibration, export, engine building and caching.

An adapter describes a model as an ordered list of the finest pieces it can be cut into
(``Unit``s: a UNet resnet+attention layer, a downsampler, a DiT transformer block, ...), each a
module with named tensor inputs and outputs. ``partition`` groups consecutive units into
``Block``s: by default one block per diffusers block (stem, each down block, mid, each up block,
head); blocks named in ``split`` stay cut into their layers, which is the granularity DeepCache's
shallowest branch needs (first layer of the first down block, last layer of the last up block).
Blocks exchange plain tensors by name, so each block is a static graph that can be exported,
swapped per timestep group, cached or skipped. Running every block in order reproduces the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from exporter.errors import UsageError


@dataclass(frozen=True)
class Unit:
    name: str  # e.g. "down0.layer1", "mid", "blocks.3"
    group: str  # the diffusers block it belongs to, e.g. "down0"; units of one group merge by default
    module: torch.nn.Module  # forward(*inputs) -> tuple of outputs, in the declared orders
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


class Block(torch.nn.Module):
    """Consecutive units run as one module: ``forward(*inputs) -> tuple(outputs)``."""

    def __init__(self, name: str, units: list[Unit], inputs: tuple[str, ...], outputs: tuple[str, ...]):
        super().__init__()
        self.name = name
        self.units = list(units)
        self.layers = torch.nn.ModuleList(u.module for u in units)
        self.inputs = inputs
        self.outputs = outputs

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        env = dict(zip(self.inputs, tensors))
        for unit in self.units:
            env.update(zip(unit.outputs, unit.module(*(env[n] for n in unit.inputs))))
        return tuple(env[n] for n in self.outputs)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, inputs={self.inputs}, outputs={self.outputs}"


def partition(units: list[Unit], final_outputs: Iterable[str], split: Iterable[str] = ()) -> list[Block]:
    """Group units into blocks: one block per unit group, except groups in ``split`` (or all groups
    when ``split`` contains ``"*"``), which become one block per unit. A block's inputs are the
    names it reads but does not produce; its outputs are the names it produces that a later block
    (or the caller, ``final_outputs``) reads."""
    split = set(split)
    groups = {u.group for u in units}
    unknown = split - groups - {"*"}
    if unknown:
        raise UsageError(f"cannot split unknown block(s) {sorted(unknown)}; blocks are: {', '.join(sorted(groups))}")
    runs: list[tuple[str, list[Unit]]] = []
    for unit in units:
        cut = "*" in split or unit.group in split
        if cut or not runs or runs[-1][1][-1].group != unit.group:
            runs.append((unit.name if cut else unit.group, [unit]))
        else:
            runs[-1][1].append(unit)
    blocks = []
    final_outputs = tuple(final_outputs)
    for i, (name, members) in enumerate(runs):
        produced = [n for u in members for n in u.outputs]
        needed_later = {n for _, later in runs[i + 1 :] for u in later for n in u.inputs} | set(final_outputs)
        inputs: list[str] = []
        internal: set[str] = set()  # produced by an earlier unit of this block
        for u in members:
            inputs += [n for n in u.inputs if n not in internal and n not in inputs]
            internal.update(u.outputs)
        outputs = tuple(dict.fromkeys(n for n in produced if n in needed_later))
        blocks.append(Block(name, members, tuple(inputs), outputs))
    return blocks


def run_blocks(blocks: list[Block], tensors: dict[str, torch.Tensor], final_outputs: Iterable[str],
               keep: dict | None = None) -> tuple:
    """Run blocks in order on named model inputs; returns the ``final_outputs`` tensors. Pass the
    inputs dict itself as ``keep`` to also get every intermediate tensor added to it by name."""
    env = keep if keep is not None else dict(tensors)
    for block in blocks:
        env.update(zip(block.outputs, block(*(env[n] for n in block.inputs))))
    return tuple(env[n] for n in final_outputs)


def blocks_to_run_with_cache(blocks: list[Block], cached: str, model_inputs: Iterable[str]) -> list[str]:
    """Names of the blocks a cached step runs when tensor ``cached`` is reused (DeepCache).

    The block reading ``cached`` and every block after it run; so do the earlier blocks that
    produce what those read (skip features, the time embedding, ...), found by walking the
    dependencies backwards. Everything else, the deep path that produced ``cached``, is skipped.
    """
    consumers = [i for i, b in enumerate(blocks) if cached in b.inputs]
    if not consumers:
        raise UsageError(f"no block reads {cached!r}; cacheable tensors are block inputs")
    first = consumers[0]
    run = set(range(first, len(blocks)))
    available = set(model_inputs) | {cached}
    needed = {n for i in run for n in blocks[i].inputs} - available
    needed -= {n for i in run for n in blocks[i].outputs}
    for i in range(first - 1, -1, -1):
        if needed & set(blocks[i].outputs):
            run.add(i)
            needed = (needed - set(blocks[i].outputs)) | (set(blocks[i].inputs) - available)
    if needed:
        raise UsageError(f"caching {cached!r} leaves {sorted(needed)} without a producer")
    return [blocks[i].name for i in sorted(run)]

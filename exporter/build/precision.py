"""Post-build precision report: which quantized layers did not run in their requested precision.

TensorRT's engine inspector (``IEngineInspector.get_layer_information`` with
``LayerInformationFormat.JSON``; engines built with detailed profiling verbosity) describes each
engine layer as JSON: ``Name`` (the ONNX node names fused into it, joined with `` + ``; a Myelin
region is ``{ForeignNode[first...last]}``), ``LayerType``, and ``Inputs`` / ``Outputs`` whose
``Format/Datatype`` (TensorRT 10, e.g. ``Int8 NC/32HW32``) or ``Datatype`` + ``Format``
(TensorRT 11) give the type each tensor runs in. The lint already knows which ONNX compute nodes
carry Q/DQ on both inputs; here each of them is looked up in the engine and its input type checked.
"""

from __future__ import annotations

from dataclasses import dataclass

# What the requested activation format looks like in the inspector's type strings
EXPECTED = {"int8": ("INT8",), "fp8": ("FP8", "FLOAT8", "E4M3")}


@dataclass
class LayerPrecision:
    graph: str
    node: str  # ONNX node name
    layer: str  # model layer
    requested: str  # activation format: int8 / fp8
    engine_layer: str | None
    input_types: list[str]
    status: str  # "ok", "fell back", "in a Myelin region" (types not listed per node), "not found"


def tensor_type(entry: dict) -> str:
    if "Format/Datatype" in entry:
        return str(entry["Format/Datatype"])
    return " ".join(str(entry[k]) for k in ("Datatype", "Format") if entry.get(k))


def _find(node: str, layers: list[dict]) -> tuple[dict | None, bool]:
    """The engine layer an ONNX node was fused into; and whether a Myelin region may hold it."""
    for layer in layers:
        if node in [part.strip() for part in str(layer.get("Name", "")).split(" + ")]:
            return layer, False
    return None, any(str(layer.get("Name", "")).startswith("{ForeignNode[") for layer in layers)


def check_precision(graph: str, quantized_nodes: dict[str, tuple[str, str]], layers: list[dict]) -> list[LayerPrecision]:
    """``quantized_nodes``: {ONNX node name: (model layer, activation format)} from the lint;
    ``layers``: the engine's layer information (parsed JSON), one dict per engine layer."""
    rows = []
    for node, (layer, fmt) in quantized_nodes.items():
        engine_layer, myelin = _find(node, layers)
        if engine_layer is None:
            rows.append(LayerPrecision(graph, node, layer, fmt, None, [],
                                       "in a Myelin region" if myelin else "not found"))
            continue
        types = [tensor_type(t) for t in engine_layer.get("Inputs") or []]
        ok = any(token in t.upper() for t in types for token in EXPECTED[fmt])
        rows.append(LayerPrecision(graph, node, layer, fmt, engine_layer.get("Name"), types,
                                   "ok" if ok else "fell back"))
    return rows


def format_precision(rows: list[LayerPrecision]) -> str:
    counts = {s: sum(r.status == s for r in rows) for s in ("ok", "fell back", "in a Myelin region", "not found")}
    lines = [(f"quantized layers in the engines: {counts['ok']} in their requested precision, "
              f"{counts['fell back']} fell back, {counts['in a Myelin region']} inside Myelin regions (types not "
              f"listed per layer), {counts['not found']} not found by name")]
    for r in rows:
        if r.status == "fell back":
            lines.append(f"  FELL BACK {r.graph}: {r.layer} ({r.node}) asked for {r.requested}, runs on "
                         f"{', '.join(r.input_types) or 'unknown types'} in engine layer {r.engine_layer!r}")
    return "\n".join(lines)

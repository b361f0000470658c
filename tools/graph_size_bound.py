#!/usr/bin/env python
"""How small could graphs folders get by names and constants alone? A size-only experiment.

    python tools/graph_size_bound.py graphs/fp32 graphs/int8 graphs/w4a16

For every graph of each folder (from ``exporter export``): drop node names and doc strings, rename
every internal tensor to a short hexadecimal id, and store identical embedded constants (the scalar
scales and zero points of Q/DQ nodes, shape constants) once per graph. Prints each folder's deployed
size (what ``exporter pipeline`` reports: manifest files plus manifest) as exported and after that
rewrite, each as a share of the first folder's (the FP32 reference) in the same state. The folders are
not changed: the rewritten graphs would lose the names lint, parity bisection and TensorRT's layer
report show, so this only bounds what such a rewrite could buy against the export issue's size
targets. ``--check`` proves the rewrite keeps every graph valid and equivalent: each rewritten graph
(saved in a temporary folder beside copies of the weight files) passes ``onnx.checker``'s full check
and gives bit-identical ONNX Runtime outputs on random inputs of its traced shapes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from exporter.export.manifest import deployed_bytes


def rewritten(path: Path) -> onnx.ModelProto:
    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    keep = {v.name for v in [*graph.input, *graph.output]}  # the block's interface keeps its names
    ids: dict[str, str] = {}

    def short(name: str) -> str:
        return name if name == "" or name in keep else ids.setdefault(name, format(len(ids), "x"))

    first_of: dict[tuple, str] = {}
    duplicates = []
    for init in graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            value = numpy_helper.to_array(init)
            key = (init.data_type, tuple(init.dims), value.tobytes())
            if key in first_of:  # the same constant again: point its readers at the first copy
                ids[init.name] = first_of[key]
                duplicates.append(init)
                continue
            first_of[key] = short(init.name)
        init.name = short(init.name)
    for init in duplicates:
        graph.initializer.remove(init)
    for node in graph.node:
        node.name, node.doc_string = "", ""
        node.input[:] = [short(n) for n in node.input]
        node.output[:] = [short(n) for n in node.output]
    return model


def check_equivalent(folder: Path) -> int:
    """Assert every rewritten graph of ``folder`` is valid and computes what the original computes;
    returns how many graphs were checked."""
    import onnxruntime as ort

    manifest = json.loads((folder / "manifest.json").read_text())
    rng = np.random.default_rng(0)
    checked = 0
    with tempfile.TemporaryDirectory() as tmp:
        for weights in folder.glob("*.weights"):  # external data resolves relative to the graph
            shutil.copyfile(weights, Path(tmp) / weights.name)  # onnx.checker refuses symbolic links
        for block in manifest["blocks"]:
            feeds = {t["name"]: rng.standard_normal(t["trace_shape"]).astype(t["dtype"]) for t in block["inputs"]}
            for graph in block["graphs"]:
                onnx.save(rewritten(folder / graph), str(Path(tmp) / graph))
                onnx.checker.check_model(str(Path(tmp) / graph), full_check=True)
                outputs = [ort.InferenceSession(str(f), providers=["CPUExecutionProvider"]).run(None, feeds)
                           for f in (folder / graph, Path(tmp) / graph)]
                assert all(np.array_equal(a, b, equal_nan=True) for a, b in zip(*outputs)), graph
                checked += 1
    return checked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path, help="graphs folders; the first is the reference (FP32)")
    parser.add_argument("--check", action="store_true", help="also prove each rewritten graph valid and equivalent")
    args = parser.parse_args()
    rows = []
    for folder in args.folders:
        graphs = sorted(folder.glob("*.onnx"))
        exported = deployed_bytes(folder)
        graph_bytes = sum(g.stat().st_size for g in graphs)
        rows.append((folder, exported,
                     exported - graph_bytes + sum(len(rewritten(g).SerializeToString()) for g in graphs)))
        if args.check:
            print(f"{folder}: {check_equivalent(folder)} rewritten graphs valid, outputs bit-identical")
    reference, reference_rewritten = rows[0][1], rows[0][2]
    print("| folder | deployed | share of the first | names and constants rewritten | share of the first, rewritten |")
    print("|---|---|---|---|---|")
    for folder, exported, smaller in rows:
        print(f"| {folder} | {exported / 1e6:.2f} MB | {exported / reference:.1%} | {smaller / 1e6:.2f} MB "
              f"| {smaller / reference_rewritten:.1%} |")


if __name__ == "__main__":
    main()

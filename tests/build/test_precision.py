from exporter.build.precision import check_precision, format_precision

NODES = {"/conv1/Conv": ("down.conv1", "int8"), "/conv2/Conv": ("down.conv2", "int8"),
         "/ff/MatMul": ("down.ff", "fp8"), "/attn/to_q/MatMul": ("down.to_q", "int8")}


def test_layers_that_fell_back_are_named_in_both_inspector_layouts():
    layers = [
        # TensorRT 10: one "Format/Datatype" string; a Q/DQ conv fused with its residual add
        {"Name": "/conv1/Conv + /Add", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "x", "Format/Datatype": "Int8 NC/32HW32"}]},
        {"Name": "/conv2/Conv", "LayerType": "CaskConvolution",
         "Inputs": [{"Name": "y", "Format/Datatype": "Row major linear FP32"}]},
        # TensorRT 11: separate "Datatype" and "Format"
        {"Name": "/ff/MatMul", "LayerType": "gemm", "Inputs": [{"Name": "z", "Datatype": "FP8", "Format": "Row major"}]},
        {"Name": "{ForeignNode[/attn/Transpose.../attn/to_out/MatMul]}", "LayerType": "Myelin", "Inputs": []},
    ]
    rows = {r.node: r for r in check_precision("down.g0.onnx", NODES, layers)}
    assert rows["/conv1/Conv"].status == "ok" and rows["/conv1/Conv"].engine_layer == "/conv1/Conv + /Add"
    assert rows["/conv2/Conv"].status == "fell back" and rows["/conv2/Conv"].input_types == ["Row major linear FP32"]
    assert rows["/ff/MatMul"].status == "ok"
    assert rows["/attn/to_q/MatMul"].status == "in a Myelin region"
    text = format_precision(list(rows.values()))
    assert "2 in their requested precision, 1 fell back, 1 inside Myelin regions" in text
    assert "FELL BACK down.g0.onnx: down.conv2 (/conv2/Conv) asked for int8, runs on Row major linear FP32" in text


def test_a_node_missing_from_the_engine_is_reported_as_not_found():
    (row,) = check_precision("g.onnx", {"/conv1/Conv": ("conv1", "int8")}, [{"Name": "/other/Conv", "Inputs": []}])
    assert row.status == "not found" and row.engine_layer is None

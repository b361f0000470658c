"""TensorRT: engine building (``exporter build``), gating, the FP8->INT8 fallback, the precision
report, and the runtime backend. Only ``exporter.build.tensorrt`` imports TensorRT."""

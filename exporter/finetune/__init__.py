"""EfficientDM-style finetuning of a PTQ model: QALoRA, temporal LSQ, data-free distillation."""

from exporter.finetune.distill import FinetuneError, apply_finetune, finetune, finetuned_source

__all__ = ["FinetuneError", "apply_finetune", "finetune", "finetuned_source"]

"""Exports: merged checkpoints (``checkpoint``, streamed tensor by tensor where it can: ``stream``; what both
share: ``plan``) and LoRA files (``lora_ops``: merge several, resize one; ``extract``: from two checkpoints)."""

from .checkpoint import export_merged_checkpoint, merge_into_pipeline, restore_weights
from .extract import extract_lora
from .lora_ops import ResizeReport, file_sha256, merge_loras, parse_dtype, resize_lora
from .plan import FORMATS, MERGE_INFO_FILE, ExportResult, checkpoint_metadata

__all__ = ["FORMATS", "MERGE_INFO_FILE", "ExportResult", "ResizeReport", "checkpoint_metadata",
           "export_merged_checkpoint", "extract_lora", "file_sha256", "merge_into_pipeline", "merge_loras",
           "parse_dtype", "resize_lora", "restore_weights"]

"""Safe file reading and atomic writing: ``atomic`` (writes renamed into place, stale temporaries cleaned),
``sniff`` (what a file really is; pickles refused unless allowed) and ``tensors`` (checked safetensors reading,
atomic and streamed safetensors writing, pickles with ``weights_only``)."""

from .atomic import atomic_dir, atomic_path, is_write_failure, remove_stale_temps, write_text_atomic
from .sniff import PICKLE_SUFFIXES, SNIFF_BYTES, not_weights_error, read_head, refuse_pickle, sniff, weights_only_refusal
from .tensors import (DTYPE_BITS, file_sha256, MAX_HEADER_BYTES, MAX_HEADER_DEPTH, SAFETENSORS_DTYPES, SAFETENSORS_NAMES,
                      TORCH_DTYPES, load_safetensors, load_state_dict, read_safetensors_header, read_safetensors_tensor,
                      save_safetensors_atomic, tensor_data_sha256,
                      write_safetensors_streamed)

__all__ = ["DTYPE_BITS", "MAX_HEADER_BYTES", "MAX_HEADER_DEPTH", "PICKLE_SUFFIXES", "SAFETENSORS_DTYPES",
           "SAFETENSORS_NAMES", "SNIFF_BYTES", "TORCH_DTYPES", "atomic_dir", "atomic_path", "file_sha256", "is_write_failure",
           "load_safetensors", "load_state_dict", "not_weights_error", "read_head", "read_safetensors_header",
           "read_safetensors_tensor", "refuse_pickle", "remove_stale_temps", "save_safetensors_atomic", "sniff",
           "tensor_data_sha256", "weights_only_refusal", "write_safetensors_streamed", "write_text_atomic"]

"""The user's models: one LoRA folder by name (``folder``: what mixing and the prompt's ``<lora:..>`` tags use),
and the whole library of WebUI / ComfyUI / loose folders with hashes and sidecars (``folders``, ``sidecars``,
``cache``, ``scan``)."""

from .cache import ScanCache, autov2
from .folder import (LORA_SUFFIXES, PICKLE_SUFFIXES, LibraryItem, available_names, list_lora_files, lora_name,
                     resolve, scan_library)
from .folders import ModelFolders, gather_folders, read_extra_model_paths
from .scan import CheckpointEntry, LoraEntry, ModelLibrary, is_training_internal, scan_models
from .sidecars import Sidecars, read_sidecars

__all__ = ["LORA_SUFFIXES", "PICKLE_SUFFIXES", "CheckpointEntry", "LibraryItem", "LoraEntry", "ModelFolders",
           "ModelLibrary", "ScanCache", "Sidecars", "autov2", "available_names", "gather_folders",
           "is_training_internal", "list_lora_files", "lora_name", "read_extra_model_paths", "read_sidecars",
           "resolve", "scan_library", "scan_models"]

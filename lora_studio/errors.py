"""Errors a user can cause.

Every message says what was wrong (repeating the bad value) and what to do.
The CLI prints ``str(err)`` and exits non-zero; the GUI shows it as a message.
Anything that is *not* a ``LoraStudioError`` is a bug in LoRA Studio.
"""

from __future__ import annotations


class LoraStudioError(Exception):
    """Base class of every error a user can cause and fix."""


class InputFileError(LoraStudioError):
    """A file or folder given by the user is missing, unreadable, corrupt or of the wrong kind."""


class UnsafeFileError(InputFileError):
    """A file would need unpickling (``.ckpt``/``.pt``/``.bin``) and that was not allowed."""


class FamilyMismatchError(LoraStudioError):
    """A LoRA or checkpoint was made for another base-model family (SD1/SD2/SDXL)."""


class LoraFormatError(InputFileError):
    """A LoRA file whose keys or shapes do not follow any known scheme."""


class ConfigError(LoraStudioError):
    """A config or preset has an unknown key, a wrong type or an out-of-range value."""


class DatasetError(LoraStudioError):
    """A training folder has no usable images, or captions that cannot be read."""


class TrainingError(LoraStudioError):
    """Training cannot go on (non-finite loss, out of memory, nothing to resume)."""


class ExportError(LoraStudioError):
    """An export could not be written (disk full, unwritable folder, non-finite weights)."""


class StopRequested(LoraStudioError):
    """Long work was asked to stop; what was done so far has been saved."""

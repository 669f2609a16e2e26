"""LoRA Studio: train, mix and export LoRAs for Stable Diffusion.

The core (everything outside ``lora_studio.ui``) never imports gradio; the CLI
(``python -m lora_studio``) and the GUI (``python app.py``) both call it.
"""

__version__ = "0.1.0"

from .cpu_memory import tune_glibc_malloc as _tune_glibc_malloc

_tune_glibc_malloc()  # see cpu_memory.py: large CPU temporaries are reused instead of re-faulted per op

"""LoRA Studio: train, mix and export LoRAs for Stable Diffusion.

The core (everything outside ``lora_studio.ui``) never imports gradio; the CLI
(``python -m lora_studio``) and the GUI (``python app.py``) both call it.
"""

__version__ = "0.1.0"

"""LoRA Studio desktop app: ``python app.py`` opens the Gradio UI on the built-in demo model."""

from lora_studio.ui.launch import entry

if __name__ == "__main__":
    entry()

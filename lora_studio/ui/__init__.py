"""The Gradio UI: thin tabs over the core. Importing this package builds nothing and starts nothing."""

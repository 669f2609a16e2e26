"""The command line: ``python -m lora_studio <command>``.

One module per command, each with ``register(subparsers)`` that adds its parser
and sets ``func`` (taking the parsed args, returning an exit code). The CLI
holds no logic: it parses, calls the core, prints.
"""

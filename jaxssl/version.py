"""jaxssl's release version (the same as pyproject.toml's; tests/test_compat.py checks). Checkpoints and exports
record it next to their format version (jaxssl/train/checkpoint.py), so a file names the jaxssl that wrote it."""

__version__ = '0.1.0'

"""The commands: what `scripts/*.py` run (train, describe, aot, evaluate, generate, prepare_data,
compare and the compare report's parts). They parse arguments, call the library and format its
results; no library module imports them (tests/test_imports.py checks it)."""

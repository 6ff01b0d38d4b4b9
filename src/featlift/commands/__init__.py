"""One module per ``featlift`` sub-command; each defines ``register(subparsers)`` and ``run(args) -> int``.

`featlift.cli` imports every module here, so a new command is one new file.
"""

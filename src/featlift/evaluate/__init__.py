"""Dense-task evaluations. Each module that defines ``register(subparsers)`` becomes ``featlift eval <task>``."""

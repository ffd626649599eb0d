"""CLI subcommands. Each module defines ``register(subparsers)``; :mod:`ppomax.cli` discovers them."""

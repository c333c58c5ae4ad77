"""Benchmarks of cluster-engine: ``python -m bench NAME [ARGS…]`` from the repository root, inside the
project's environment (``./dev run python -m bench run --quick``); see bench/README.md and ``__main__``."""

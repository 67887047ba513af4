"""Command-line entry points (lazy imports keep --help instant)."""

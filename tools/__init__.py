"""Command-line tools: thin front ends over irdro (a package so tests can import them)."""

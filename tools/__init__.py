"""Command-line tools: thin front ends over irdro.

Run from a checkout as `python tools/X.py` (irdro must be installed, as `make setup` does), or as the
console scripts `irdro-*` that setup.cfg installs from this folder under the package name
`irdro_tools` (the name tests and benchmarks import it by)."""

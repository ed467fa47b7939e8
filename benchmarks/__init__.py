"""Benchmarks (run as scripts: python benchmarks/NAME.py); a package so that one can import another."""

"""`make bench` (`python -m benchmarks.bench` from the repository root); not part of the package."""

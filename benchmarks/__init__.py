"""Benchmarks, each a script run from the repo root (`python benchmarks/scan.py`). study_step.py, which reads the
Fashion-MNIST study's recipe from the experiments package, runs as a module: `python -m benchmarks.study_step`."""

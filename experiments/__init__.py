"""Studies run on the star library. Each is a package run from the repo root as modules, e.g.
`python -m experiments.fashion_mnist.study status`."""

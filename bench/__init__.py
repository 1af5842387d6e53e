"""Speed benchmarks, each printing JSON lines (results in bench/results/).

Run from the repository root as modules, e.g. `python -m bench.train_step ...` or
`python -m bench.suite --preset cpu`; the correctness and quality experiments are in
bench/experiments/.
"""

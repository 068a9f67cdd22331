"""Benchmarks of the outbox relay, each against a baseline measured in the same run.

`python -m bench --help` lists the options; `bench.cli` says what each benchmark measures.
"""

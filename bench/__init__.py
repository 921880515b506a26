"""Comzy's benchmark harness: ``python -m bench`` (full) or ``python -m bench --quick`` (smoke test).

It measures the same local apps directly and through a real ``comzy-server`` and ``comzy``
agent in one run, alternating, and writes results.json, results.md and PNG charts. See
docs/benchmarks.md.
"""

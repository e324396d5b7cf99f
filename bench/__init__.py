"""Benchmarks of virtiofsd-py: in-guest fio and workloads, guest-free microbenchmarks.

Run with ``python3 -m bench`` (see docs/benchmarks.md). Nothing here is
imported by the daemon or the tests, except the smoke test of the
microbenchmark.
"""

"""Benchmark suites and report of ofakd_fast: not installed (setup.py lists only ofakd_fast). See README.md."""

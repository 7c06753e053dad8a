"""Koerier's performance harness: load shapes, a subscriber sink, the runner and its report.

``perf/run PROFILE`` is the entry point; ``docs/performance.md`` explains the profiles, the
thresholds and the measured figures.
"""

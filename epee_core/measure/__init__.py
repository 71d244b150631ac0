"""Measurement tools: engine benchmarks, performance and results reports, Locust load tests, soaks, plots."""

"""Measuring policies on labelled data: task metrics, average exit layer and engine throughput."""

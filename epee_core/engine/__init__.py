"""The early-exit engine: backbone adapters, exit heads, exit policies and the layer-wise runner.

Plain PyTorch on top of `transformers`; it imports nothing else of `epee_core`, so it can run behind any server.
"""

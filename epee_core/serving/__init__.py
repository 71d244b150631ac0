"""Serving requests with the engine: request decoding and validation, batched engine calls, answers, request
logs and the `epee:` serving configuration. Server-agnostic: the TorchServe handlers are thin wrappers."""

"""TorchServe handlers for early-exit models: thin wrappers that move rows into `epee_core.serving` and back."""

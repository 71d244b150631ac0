"""Integration tests: a real TorchServe on 127.0.0.1 serving freshly packaged tiny models."""

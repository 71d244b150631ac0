"""Running models on TorchServe: `.mar` packaging, the server launcher, the management client, the demo."""

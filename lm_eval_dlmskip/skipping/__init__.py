"""Skipping: the policies the model asks before every block, routers and their checkpoints, skip
profiles, the identity of the model an artifact was made on, and FLOPs accounting. Below the
models: nothing here imports a model, a decoding algorithm or lm-eval."""

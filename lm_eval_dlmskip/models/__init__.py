"""The models: LLaDA and Dream natively (config.py, llada.py), how a forward runs its blocks under
a skip policy and a KV cache (execution.py), loading checkpoints (loading.py), and the view of an
HF causal LM's decoder layers that hf_skip skips (hf_layers.py). They ask skipping/'s policies;
nothing here imports a decoding algorithm or lm-eval."""

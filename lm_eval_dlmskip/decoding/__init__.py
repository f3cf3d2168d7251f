"""Decoding algorithms, pure functions of a ``denoise`` callable: LLaDA's diffusion generation with
Fast-dLLM's cache windows and threshold (generate.py), Dream's sampler (dream.py), Monte-Carlo
likelihood (likelihood.py), the counter-based sampling noise (noise.py), and CUDA-graph replay of
the model's forwards (graphs.py). They drive models/; nothing here imports lm-eval."""

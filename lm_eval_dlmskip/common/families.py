"""The model families the package knows, by the key checkpoints, routers and profiles record."""

FAMILIES = {"llada": "LLaDA", "dream": "Dream", "llada2": "LLaDA2", "hf": "HF causal LM"}  # family -> display name

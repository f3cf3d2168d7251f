"""The lm-eval adapters: one thin class per family (llada.py, dream.py, hf.py) over the shared
request handling of the diffusion families (base.py); the model_args parsed once (model_args.py),
the skip method made a policy (skip_method.py), the generation-settings precedence
(gen_kwargs.py), --use_cache (answer_cache.py) and the FLOPs table (flops_table.py)."""

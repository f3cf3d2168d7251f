"""Evaluate diffusion language models (LLaDA) with inference-time layer skipping in lm-eval.

Importing this package loads neither torch nor lm-eval: ``lm_eval --model llada_skip`` finds the
model through a start-up hook (``_hook.py``) that registers it when lm-eval's registry loads.
"""

__version__ = "0.1.0"

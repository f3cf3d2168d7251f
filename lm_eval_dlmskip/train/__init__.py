"""``dlmskip train``: learn the routers of a frozen diffusion LM (the router paper's recipe).

config.py holds the run's settings and options, objective.py the loss and the validation,
loop.py the optimisation, state.py what makes a run resumable, cli.py the command.
``python -m lm_eval_dlmskip.train`` runs cli.main.
"""

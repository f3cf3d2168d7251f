"""Reports over lm-eval results files: one module per ``dlmskip`` subcommand, plus their plots."""

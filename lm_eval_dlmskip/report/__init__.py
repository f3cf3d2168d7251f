"""Reports: one module per ``dlmskip`` subcommand (calibrate, analyze, sweep, compare), the leaderboard
compare builds from lm-eval results files, and the plots."""

"""Grids of cells: planning (plan), running them here or on workers (run, ray, slurm; executors
picks one by name) and studies (study), named sets of runs that regenerate a published
leaderboard."""

"""Grids of cells: planning (plan), running them here or on workers (run, ray, slurm) and
studies (study), named sets of runs that regenerate a published leaderboard."""

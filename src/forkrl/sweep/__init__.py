"""Seeded ablations in one command (`forkrl sweep`): cells × seeds, local or Slurm, resumable, with t intervals.

- `grid`: cells and seeds from `--cell` / `--grid` / `--seeds` or a sweep file;
- `run`: the plan as jobs, skipping finished ones, and the report at the end;
- `runner`: one job in its own process (train via `forkrl train`'s function, then the final eval);
- `launch`: local processes with a thread budget each, or submitit;
- `stats`: Student-t intervals, paired differences, curve bands; `report`: summary.json/.md, figures.
"""

"""`forkrl sweep CONFIG ...` (run or continue a sweep) and `forkrl sweep report DIR`, as a typer sub-app.

Its user errors are shown as one line by the root command (`forkrl.errors.user_errors`)."""

from __future__ import annotations

import typer
from typer.core import TyperGroup


class _RunByDefault(TyperGroup):
    """`forkrl sweep CONFIG ...` means `forkrl sweep run CONFIG ...`; `report` stays a subcommand."""

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and not args[0].startswith("-"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


app = typer.Typer(
    cls=_RunByDefault,
    help="Seeded ablations: every cell x seed trained and evaluated, resumable; report with 95% CIs.",
    no_args_is_help=True,
)


@app.command(
    "run",
    context_settings={"allow_extra_args": True},
    epilog="Example: forkrl sweep configs/toy_countdown.yaml --setup toy --cell selection.strategy=all "
    "--cell selection.strategy=top,selection.ratio=0.2 --seeds 0,1,2 --jobs 2 --baseline selection.strategy=all "
    "--out runs/toy_ablation",
)
def run(
    config: str = typer.Argument(
        ..., help="Training recipe (as for forkrl train) or a sweep file (YAML with config:)."
    ),
    overrides: list[str] = typer.Argument(None, help="key=value overrides applied to every run."),
    grid: list[str] = typer.Option(None, "--grid", help="KEY=V1,V2,...: one axis of the cross product; repeat."),
    cell: list[str] = typer.Option(None, "--cell", help="KEY=V[,KEY=V...]: one cell, crossed with the grid; repeat."),
    seeds: str = typer.Option(None, "--seeds", help="Seeds of every cell: 0,1,2 or 0-4 (default 0)."),
    out: str = typer.Option(None, "--out", help="Sweep directory (runs, logs, report)."),
    baseline: str = typer.Option(
        None, "--baseline", help="The cell the others are compared with, e.g. selection.strategy=all (paired by seed)."
    ),
    setup: str = typer.Option(
        None,
        "--setup",
        help="Data/model hook run once per seed: toy (the toy Countdown "
        "data and base model) or module:function(data_dir, seed) -> overrides.",
    ),
    jobs: int = typer.Option(None, "--jobs", "-j", help="Runs at a time (local: each gets cores // jobs threads)."),
    launcher: str = typer.Option(None, "--launcher", help="local (default) or submitit (Slurm jobs)."),
    cluster: str = typer.Option(
        None, "--submitit-cluster", help="submitit cluster: slurm, local or debug (default: detected)."
    ),
    slurm: list[str] = typer.Option(
        None,
        "--slurm",
        help="KEY=VALUE Slurm parameter for submitit, e.g. partition=gpu, gpus_per_node=1, timeout_min=120; repeat.",
    ),
) -> None:
    """Train and evaluate every cell x seed (skipping finished runs, resuming interrupted ones), then report."""
    from forkrl.sweep.run import plan_from_options, run_sweep

    plan = plan_from_options(
        config, grid or [], cell or [], seeds, out, overrides or [], baseline, setup, jobs, launcher
    )
    params = {}
    for item in slurm or []:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise typer.BadParameter(f"--slurm {item!r}: expected KEY=VALUE")
        params[key.strip()] = value.strip()
    try:
        summary = run_sweep(plan, cluster=cluster, slurm=params, echo=typer.echo)
    except KeyboardInterrupt as err:
        typer.echo(f"stopped: {err or 'interrupted'}; re-run the same command to continue", err=True)
        raise typer.Exit(130) from None
    if summary["failed"]:
        raise typer.Exit(1)


@app.command("report", epilog="Example: forkrl sweep report runs/toy_ablation --baseline selection.strategy=all")
def report(
    directory: str = typer.Argument(..., help="A sweep directory (made by forkrl sweep)."),
    baseline: str = typer.Option(None, "--baseline", help="Compare with this cell instead of the sweep's baseline."),
) -> None:
    """Write summary.json, summary.md and figures/*.png of a sweep (mean ± 95% t CI, paired differences, cost)."""
    from forkrl.sweep.report import write_report

    summary = write_report(directory, baseline)
    typer.echo(f"{len(summary['cells'])} cells, {len(summary['missing'])} runs missing; {directory}/summary.md")


@app.command("export", epilog="Example: forkrl sweep export runs/toy_ablation docs/ablation/results")
def export(
    directory: str = typer.Argument(..., help="A sweep directory (made by forkrl sweep)."),
    dest: str = typer.Argument(..., help="Where the results go (e.g. a folder you commit)."),
) -> None:
    """Copy a sweep's results (report, per-run results and metrics, no checkpoints) to DEST, to commit them;
    DEST copied back as a sweep directory continues the sweep with the missing runs only."""
    from forkrl.sweep.export import export_results

    written = export_results(directory, dest)
    typer.echo(f"{len(written)} files written to {dest}")

"""The `forkrl` command: one entry point, one subcommand per job."""

from __future__ import annotations

import typer

from forkrl import __version__

app = typer.Typer(
    name="forkrl",
    help="RL with verifiable rewards on language models, built around high-entropy forking tokens.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"forkrl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """RL with verifiable rewards on language models, built around high-entropy forking tokens."""


@app.command("info")
def info() -> None:
    """Print the versions of forkrl and its core dependencies and the devices torch can see."""
    import torch
    import transformers

    typer.echo(f"forkrl        {__version__}")
    typer.echo(f"torch         {torch.__version__}")
    typer.echo(f"transformers  {transformers.__version__}")
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    typer.echo(f"devices       cpu ({torch.get_num_threads()} threads), {cuda} CUDA GPU(s)")


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""The typer application object that every command module registers on."""
from __future__ import annotations

import typer

app = typer.Typer(
    name="gradscope",
    help="Does your gradient clipping protect you? Record gradient norms, get a clip norm, fail CI on NaN.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        from gradscope._version import __version__

        print(f"gradscope {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version and exit."),
) -> None:
    """Does your gradient clipping protect you?"""

"""``python -m sharder.curate INPUT_DIR OUTPUT_DIR --data RECIPE``: the curate stage on its own.

Exit codes as ``fineweb-sharder``: 0 done, 2 user error (one line on stderr), and 75 (EX_TEMPFAIL)
when the steps were submitted to Slurm: run the same command again once the jobs have finished.
Killed at any point, the same command resumes at the first datatrove task without a completion marker.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from sharder.errors import EXIT_USER_ERROR, ShardError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None)


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def curate(
    input_dir: Annotated[Path, typer.Argument(help="A complete text shard directory (with manifest.json).")],
    output_dir: Annotated[Path, typer.Argument(help="Where the curated shards and their manifest go.")],
    data: Annotated[Path, typer.Option("--data", help="The recipe whose data.curate section to apply.")],
) -> None:
    """Dedup (exact + MinHash) and filter (quality, perplexity) text shards, as the recipe says."""
    from rich.console import Console

    from sharder.curate.run import CurateLaunched, run_curate
    from sharder.recipe import load_recipe

    console = Console(stderr=True)
    try:
        recipe = load_recipe(data)
        if recipe.curate is None or not recipe.curate.active:
            raise ShardError(f"{data}: data.curate: nothing to do (set dedup, quality or perplexity)")
        run_curate(input_dir, output_dir, recipe.curate, console)
    except CurateLaunched as exc:
        console.print(str(exc), highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code) from None
    except ShardError as exc:
        console.print(f"error: {exc}", highlight=False, markup=False, soft_wrap=True)
        raise typer.Exit(EXIT_USER_ERROR) from None


if __name__ == "__main__":
    os.environ.setdefault("USE_TORCH", "0")
    app()

"""Named heuristic quality filters, each one of datatrove's (the rules FineWeb, C4 and Gopher used).

A recipe switches them on by name and passes options through to the datatrove class:
``quality: {gopher_quality: {min_doc_words: 20}, fineweb: {}}``. A wrong option is reported
before any work, naming the filter and the option.
"""

from __future__ import annotations

import inspect
from typing import Any

from sharder.errors import ShardError

QUALITY_FILTERS = {
    "gopher_quality": "GopherQualityFilter",
    "gopher_repetition": "GopherRepetitionFilter",
    "c4": "C4QualityFilter",
    "fineweb": "FineWebQualityFilter",
}


def check_quality_options(config: dict[str, dict[str, Any]]) -> None:
    """Each filter's options are parameters of its datatrove class; checked without building it."""
    import datatrove.pipeline.filters as filters

    for name, options in config.items():
        cls = getattr(filters, QUALITY_FILTERS[name])
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "exclusion_writer"}
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise ShardError(f"data.curate.quality.{name}.{unknown[0]}: unknown option (options: {', '.join(sorted(accepted))})")


def quality_steps(config: dict[str, dict[str, Any]]) -> list[Any]:
    """The datatrove filter steps for ``config`` (name -> options), in the recipe's order."""
    import datatrove.pipeline.filters as filters

    check_quality_options(config)
    return [getattr(filters, QUALITY_FILTERS[name])(**options) for name, options in config.items()]

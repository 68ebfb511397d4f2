"""Named heuristic quality filters, each one of datatrove's (the rules FineWeb, C4 and Gopher used).

A recipe switches them on by name and passes options through to the datatrove class:
``quality: {gopher_quality: {min_doc_words: 20}, fineweb: {}}``.
"""

from __future__ import annotations

from typing import Any

QUALITY_FILTERS = {
    "gopher_quality": "GopherQualityFilter",
    "gopher_repetition": "GopherRepetitionFilter",
    "c4": "C4QualityFilter",
    "fineweb": "FineWebQualityFilter",
}

"""The service's closed vocabularies, each spelled once; the proto enums mirror them (convert.py maps
both ways and checks at import that every value has its proto twin).

They are `Literal` string types, not enums: the values travel as plain text into logs, metrics
labels and the proto conversion, and a type checker holds every use to its set. The plan's own
vocabularies (buffer owner, kind, placement, element types) live in compute/backend.py.
"""

from __future__ import annotations

from typing import Literal, get_args

from compute.backend import KV_TYPES, KvType

DrafterType = Literal["none", "draft", "ngram"]  # speculation off | a draft model | n-gram prompt lookup
FinishReason = Literal["stop", "length", "cancelled"]  # EOG or stop string | max_tokens or context full | cancelled
PairState = Literal["loading", "ready", "draining"]  # a pair's life in the registry

DRAFTER_TYPES: tuple[str, ...] = get_args(DrafterType)
FINISH_REASONS: tuple[str, ...] = get_args(FinishReason)
PAIR_STATES: tuple[str, ...] = get_args(PairState)

__all__ = ["DrafterType", "FinishReason", "PairState", "KvType", "DRAFTER_TYPES", "FINISH_REASONS", "PAIR_STATES",
           "KV_TYPES"]

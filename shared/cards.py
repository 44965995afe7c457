"""Character cards: the artifacts the ``character`` instructor makes and the card-based
instructors (stylized_response, gtkm, awareness, rp) work from.

A card travels to the generator inside ``GenerateBatch.inputs`` as ``{"name", "data"}``
(``card_inputs``), and is kept on disk (embedded: the character ``output_dir``) or in the
object store (services: ``jobs/<id>/characters/``) as the original's file: one JSON object
``{description, stay_in_character, name}`` named by the md5 of its description.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from airoboros.contracts import Artifact

#: the artifact kind of a character card
CARD_KIND = "character"


def card_name(card: Artifact | dict[str, Any]) -> str:
    return card.name if isinstance(card, Artifact) else str(card["name"])


def card_data(card: Artifact | dict[str, Any]) -> dict[str, Any]:
    return card.data if isinstance(card, Artifact) else dict(card.get("data", card))


def card_inputs(cards: Sequence[Artifact]) -> list[dict[str, Any]]:
    """Cards in the shape a batch carries them."""
    return [{"name": c.name, "data": c.data} for c in cards]


def card_file_name(card: Artifact) -> str:
    """The original's file name: the md5 of the description."""
    description = str(card.data.get("description", card.name))
    return hashlib.md5(description.encode("utf-8")).hexdigest() + ".json"


def card_json(card: Artifact) -> str:
    """The original's card file: {description, stay_in_character, name}."""
    return json.dumps(
        {
            "description": card.data.get("description", ""),
            "stay_in_character": card.data.get("stay_in_character", ""),
            "name": card.name,
        },
        ensure_ascii=False,
        indent=2,
    )


def parse_card_file(raw: bytes | str) -> Artifact | None:
    """A card from one saved file (ours or the original's); None when it is not one."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not (isinstance(data, dict) and data.get("name") and data.get("description")):
        return None
    return Artifact(
        kind=CARD_KIND,
        name=str(data["name"]),
        data={
            "description": str(data["description"]),
            "stay_in_character": str(data.get("stay_in_character", "")),
        },
    )

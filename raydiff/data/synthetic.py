"""A generated toy news corpus, so that the smoke config trains anywhere with no download.

Sentences come from a small grammar of financial-wire phrases, which gives a model real
structure to learn (agreement between slots, fixed phrases) in a few hundred steps.
"""

from __future__ import annotations

import random

_COMPANIES = ["Acme Corp", "Globex", "Initech", "Umbrella Holdings", "Stark Industries",
              "Wayne Enterprises", "Hooli", "Vandelay Imports", "Soylent Inc", "Tyrell Group"]
_SECTORS = ["oil", "steel", "grain", "coffee", "software", "shipping", "copper", "banking"]
_CITIES = ["New York", "London", "Tokyo", "Frankfurt", "Chicago", "Singapore", "Paris"]
_QUARTERS = ["first", "second", "third", "fourth"]
_MOVES = [("rose", "up"), ("fell", "down"), ("climbed", "up"), ("slipped", "down")]
_OFFICIALS = ["chairman", "chief executive", "spokesman", "finance director", "analyst"]


def _sentence(rng: random.Random) -> str:
    company, sector, city = rng.choice(_COMPANIES), rng.choice(_SECTORS), rng.choice(_CITIES)
    verb, direction = rng.choice(_MOVES)
    pct, quarter = rng.randint(1, 40), rng.choice(_QUARTERS)
    templates = [
        f"{company} said {quarter} quarter profit {verb} {pct} pct .",
        f"{sector} prices {verb} {pct} pct in {city} trading .",
        f"shares of {company} were {direction} {pct} cents in {city} .",
        f"the {rng.choice(_OFFICIALS)} of {company} said demand for {sector} was strong .",
        f"{company} will buy a {sector} unit in {city} for {pct} mln dlrs .",
        f"{city} {sector} exports {verb} in the {quarter} quarter , officials said .",
    ]
    return rng.choice(templates)


def synthetic_news(num_articles: int, seed: int = 0) -> list[dict[str, str]]:
    """`num_articles` articles of 2-6 one-sentence lines: [{"id": ..., "text": ...}, ...]."""
    rng = random.Random(seed)
    return [
        {"id": f"synthetic-{i}",
         "text": "\n".join(_sentence(rng) for _ in range(rng.randint(2, 6)))}
        for i in range(num_articles)
    ]

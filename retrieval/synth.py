"""Synthetic catalogues for scale tests (``recagent data synth --items N --users U``).

Items belong to topics of Zipf-distributed size; a topic has its own genres, era and keywords, which its items'
titles, years, genres and descriptions draw on (so text carries signal, as it does in real catalogues). Item
popularity is Zipf-distributed. Each user follows one to three topics; a history is a walk over them: most steps go
to one of the next few items of the topic's chain (sequential structure a sequential model can learn), some to a
popular item of the topic (collaborative structure), a few to any popular item. Everything is vectorised over
users, so a million items and hundreds of thousands of users take seconds, not hours. Seeded.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from pydantic import BaseModel, Field

from retrieval.catalog import Catalog
from retrieval.movielens import GENRES


def _words(text: str, sep: str | None = None) -> tuple[str, ...]:
    return tuple(text.split(sep))


WORDS = _words(
    "silent harbor golden river midnight garden broken crown winter letter hidden signal crimson tide paper moon "
    "iron valley distant shore burning bridge glass house northern light empty road secret island stolen summer "
    "velvet storm last station quiet fire open sky wild heart frozen lake lost city falling star dark forest "
    "bright morning twelfth night silver key long shadow red desert blue canyon final hour sleeping giant "
    "shattered mirror electric dream restless sea hollow hill painted veil wandering soul burning sand "
    "clockwork bird ancient map black orchid white tower"
)
THEMES = _words(
    "revenge heist romance betrayal survival friendship rivalry escape investigation invasion rebellion "
    "inheritance conspiracy redemption exile pilgrimage courtship vendetta expedition mutiny reunion ambition "
    "deception sacrifice obsession homecoming disappearance prophecy haunting uprising"
)
PLACES = _words(sep=", ", text=
    "a mountain village, a port city, a space station, a boarding school, a frontier town, a royal court, a "
    "fishing boat, a jazz club, a desert outpost, a hospital ward, a newsroom, a vineyard, a submarine, a circus, "
    "a rain-soaked metropolis, an island monastery, a border checkpoint, a racing team"
)


class SynthConfig(BaseModel):
    items: int = Field(ge=10, le=5_000_000)
    users: int = Field(ge=10, le=5_000_000)
    seed: int = 0
    mean_history: float = Field(default=20.0, ge=3, description="mean events per user (lognormal, 5..200)")
    items_per_topic: int = Field(default=200, ge=5, description="mean topic size")
    chain_share: float = Field(default=0.55, ge=0, le=1, description="steps to one of the next items of a chain")
    topic_share: float = Field(default=0.35, ge=0, le=1, description="steps to a popular item of a followed topic")
    zipf: float = Field(default=1.0, gt=0, description="item popularity ~ rank^-zipf")


def synth_catalog(name: str, config: SynthConfig) -> Catalog:
    """A catalogue named ``name`` as :class:`SynthConfig` describes (items, interactions; no users table)."""
    rng = np.random.default_rng(config.seed)
    n, n_users = config.items, config.users
    genres = [g for g in GENRES if g != "unknown"]

    # topics: Zipf-ish sizes, each with genres, an era and keywords
    n_topics = max(2, n // config.items_per_topic)
    sizes = rng.pareto(1.5, n_topics) + 1.0
    topic_of = np.sort(rng.choice(n_topics, size=n, p=sizes / sizes.sum()))  # items grouped by topic, in chain order
    topic_genres = [rng.choice(len(genres), size=int(rng.integers(1, 3)), replace=False) for _ in range(n_topics)]
    topic_era = rng.integers(1940, 2021, n_topics)
    topic_words = rng.integers(0, len(WORDS), (n_topics, 3))
    topic_theme = rng.integers(0, len(THEMES), n_topics)
    topic_place = rng.integers(0, len(PLACES), n_topics)

    # items
    years = np.clip(topic_era[topic_of] + rng.normal(0, 4, n).round().astype(int), 1920, 2024)
    extra_genre = np.where(rng.random(n) < 0.3, rng.integers(0, len(genres), n), -1)
    word_a = np.where(rng.random(n) < 0.6, topic_words[topic_of, 0], rng.integers(0, len(WORDS), n))
    word_b = rng.integers(0, len(WORDS), n)
    ids = [f"i{i}" for i in range(n)]
    titles = [f"{WORDS[a].title()} {WORDS[b].title()} {i % 97 + 1}" for i, (a, b) in enumerate(zip(word_a, word_b,
                                                                                               strict=True))]
    item_genres = []
    for t, g in zip(topic_of, extra_genre, strict=True):
        names = [genres[j] for j in topic_genres[t]]
        if g >= 0 and genres[g] not in names:
            names.append(genres[g])
        item_genres.append(names)
    descriptions = [f"A story of {THEMES[topic_theme[t]]} in {PLACES[topic_place[t]]}, where "
                    f"{WORDS[topic_words[t, 1]]} meets {WORDS[topic_words[t, 2]]}." for t in topic_of]
    items = pd.DataFrame({"item_id": ids, "title": titles, "description": descriptions, "genres": item_genres,
                          "year": pd.array(years, dtype="Int64"),
                          "metadata": [json.dumps({"topic": int(t)}) for t in topic_of]})

    # popularity, and per-topic cumulative weights for sampling a topic's popular items
    weight = (1.0 + rng.permutation(n)) ** -config.zipf
    start = np.searchsorted(topic_of, np.arange(n_topics))
    stop = np.searchsorted(topic_of, np.arange(n_topics), side="right")
    cum = np.cumsum(weight)
    cum_before = np.concatenate([[0.0], cum])
    global_p = weight / weight.sum()

    def popular_in(topics: np.ndarray) -> np.ndarray:
        lo, hi = cum_before[start[topics]], cum_before[stop[topics]]
        pick = np.searchsorted(cum, lo + rng.random(len(topics)) * (hi - lo), side="right")
        return np.clip(pick, start[topics], stop[topics] - 1)

    # users: followed topics (popular topics more likely), history lengths, then a walk, vectorised over users
    topic_weight = (stop - start).astype(float) ** 0.8
    topic_weight[stop == start] = 0
    follows = rng.choice(n_topics, size=(n_users, 3), p=topic_weight / topic_weight.sum())
    n_follow = rng.integers(1, 4, n_users)
    sigma = 0.8
    raw = rng.lognormal(np.log(config.mean_history) - sigma**2 / 2, sigma, n_users)
    lengths: np.ndarray[tuple[int], np.dtype[np.int64]] = np.clip(raw.round(), 5, 200).astype(np.int64)
    steps = int(lengths.max())
    walk = np.empty((n_users, steps), dtype=np.int64)
    current_topic = follows[np.arange(n_users), 0]
    current = popular_in(current_topic)
    for s in range(steps):
        if s:
            r = rng.random(n_users)
            chain = r < config.chain_share
            topic = (r >= config.chain_share) & (r < config.chain_share + config.topic_share)
            other = ~(chain | topic)
            nxt = current.copy()
            ahead = current[chain] + rng.integers(1, 4, int(chain.sum()))
            at_end = ahead >= stop[topic_of[current[chain]]]  # the chain ran out: a popular item of the topic
            ahead[at_end] = popular_in(topic_of[current[chain][at_end]])
            nxt[chain] = ahead
            switch = topic & (rng.random(n_users) < 0.3)
            current_topic = np.where(switch, follows[np.arange(n_users), rng.integers(0, 3, n_users) % n_follow],
                                     current_topic)
            nxt[topic] = popular_in(current_topic[topic])
            nxt[other] = rng.choice(n, size=int(other.sum()), p=global_p)
            current = nxt
        walk[:, s] = current
    keep = np.arange(steps)[None, :] < lengths[:, None]
    users = np.repeat(np.arange(n_users), lengths)
    events = walk[keep]
    t0 = 1_600_000_000 + rng.integers(0, 10_000_000, n_users)
    gaps = rng.integers(60, 86_400, events.size)
    user_start = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    clock = np.cumsum(gaps) - np.repeat(np.cumsum(gaps)[user_start] - gaps[user_start], lengths)
    interactions = pd.DataFrame({
        "user_id": pd.array([f"u{u}" for u in users], dtype="str"),
        "item_id": pd.array([ids[i] for i in events], dtype="str"),
        "timestamp": (t0[users] + clock).astype(np.int64),
        "rating": np.full(events.size, np.nan),
    }).drop_duplicates(["user_id", "item_id"], keep="first", ignore_index=True)
    return Catalog(name=name, items=items, interactions=interactions)

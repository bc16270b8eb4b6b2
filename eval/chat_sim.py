"""Simulated-user evaluation of the chat agent (in the spirit of iEvaLM).

Each simulated user is a test case of the leave-last-out split: it opens by naming two items of its visible
history and then, while the agent misses, answers with attributes of its hidden target (genres, decade, a
keyword of its description), never its title or id. Users speak in varied phrasing: each message is drawn (seeded
per user) from templates written for the simulator, with paraphrases and a few typos (:data:`OPENINGS`,
:data:`GENRE_HINTS`, ...), not from the rules' lexicon, so the evaluation also measures how well requests are
understood. Half of the users (seeded) describe the target's genre instead of naming it ("sheriffs and saloons",
:data:`GENRE_DESCRIPTIONS`): words the lexicon mostly lacks, which the agents can only take as free text.
Success: the target is among a turn's picks within ``turns`` turns. The LLM agent and a retrieval-only agent
(``use_llm=False``) meet the same users, and both retrieve with CF models fitted without the test targets.
"""

from __future__ import annotations

import logging
import random
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from agent.chat.agent import ChatAgent
from agent.chat.config import ChatConfig
from agent.chat.state import SQLiteSessionStore
from agent.service import RecommenderService
from eval.metrics import bootstrap_ci, paired_bootstrap_diff
from retrieval.catalog import Catalog
from retrieval.splits import Case, SplitSpec, split_catalog

logger = logging.getLogger(__name__)
_STOP = {
    "about",
    "after",
    "their",
    "there",
    "which",
    "while",
    "where",
    "with",
    "from",
    "into",
    "this",
    "that",
    "when",
    "they",
    "them",
    "have",
    "been",
    "over",
    "under",
    "against",
    "through",
    "before",
    "during",
}


# Templates of the simulated users' messages (written for the simulator, not taken from the rules' lexicon;
# some with typos). {a}/{b}: catalogue titles; {g1}/{g2}/{g3}: genre names (lower case); {d}: a decade's first
# year; {dd}: its two digits; {dw}: it in words; {kw}: a word of the target's description.
OPENINGS = (
    "I liked {a} and {b}. What should I watch next?",
    "{a} and {b} were great, what else would I enjoy?",
    "Big fan of {a}, and {b} too. Any suggestions?",
    "i really enjoyed {a} and {b} - reccomend me somethin",
    "loved {a} and {b}!! whats next",
    "I've been watching {a} and {b} lately and liked both. Ideas?",
)
GENRE_HINTS = (
    "Not quite. I'd like something {g1} and {g2}.",
    "hmm no, more in the mood for {g1} and {g2}",
    "Nah. Got any {g1} films? {g2} would be nice too",
    "not really my thing, looking for {g1} / {g2} stuff",
    "none of those grab me. I want a {g1} {g2} movie",
)
GENRE_HINTS_ONE = (
    "Not quite. I'd like something {g1}.",
    "nah, more in the mood for {g1}",
    "Got any {g1} films?",
    "not my thing. looking for {g1} stuff",
)
# Genres described rather than named: what a user might say for each (written for the simulator; some of these
# words are in the rules' lexicon, most are not). Used instead of GENRE_HINTS for a seeded share of the users.
GENRE_DESCRIPTIONS: dict[str, tuple[str, ...]] = {
    "Action": ("car chases and shootouts", "a hero fighting his way through a gang of bad guys",
               "big stunts and fistfights"),
    "Adventure": ("a quest to a far-off land", "explorers searching for a lost treasure",
                  "a journey across jungles and deserts"),
    "Animation": ("drawn characters rather than actors", "hand-drawn characters", "characters made of clay or ink"),
    "Children's": ("a film my little ones can watch", "a film suitable for a seven-year-old",
                   "a film the whole household can watch, toddlers included"),
    "Comedy": ("jokes and silly situations", "a film that cracks me up", "lots of gags"),
    "Crime": ("cops chasing a gang of robbers", "criminals and the police", "a story from the underworld"),
    "Documentary": ("real events filmed as they happened", "a true account with interviews",
                    "non-fiction, about real people"),
    "Drama": ("a serious story about people's lives", "an emotional story that might make me cry",
              "a moving character study"),
    "Fantasy": ("wizards and dragons", "elves, spells and enchanted kingdoms", "a world of myths and creatures"),
    "Film-Noir": ("a hard-boiled detective in a shadowy city", "a cynical private eye and a femme fatale"),
    "Horror": ("ghosts and haunted houses", "monsters that keep me up at night", "a killer stalking teenagers"),
    "Musical": ("lots of songs and dance numbers", "people bursting into song", "a story told through singing"),
    "Mystery": ("a puzzle to solve until the very end", "a detective piecing together clues",
                "a secret that unravels slowly"),
    "Romance": ("two people falling in love", "a love affair", "a couple finding each other"),
    "Sci-Fi": ("robots, aliens and other planets", "time travel or faraway galaxies", "spaceships in the far future"),
    "Thriller": ("edge-of-my-seat tension", "a nail-biter", "a chase where someone is always in danger"),
    "War": ("soldiers on the battlefield", "a story set during World War II", "troops behind enemy lines"),
    "Western": ("gunslingers and outlaws on the frontier", "sheriffs and saloons", "the old frontier"),
}
DESCRIBED_HINTS = (
    "Not quite. I'm in the mood for {p1}.",
    "hmm no. I'd like {p1}",
    "nah, what I want is {p1}",
    "none of those. more like {p1}, please",
)
DESCRIBED_SHARE = 0.5  # of the users whose genre hint is a description
DECADE_HINTS = (
    "Something from the {d}s.",
    "ideally made in the {dd}s",
    "preferably from the {dw}",
    "anything from around {d}-{d9}?",
    "somethng from the {dd}s pls",
)
KEYWORD_HINTS = (
    "Maybe something with {kw}.",
    "ideally one involving {kw}",
    "one with {kw} in it, if possible",
    "maybe a story with {kw}?",
)
EXTRA_GENRE_HINTS = (
    "Something {g3} too.",
    "a bit of {g3} would be good as well",
    "{g3} too, if there is any",
)
FALLBACKS = (
    "None of those. Something else, please.",
    "nope, none of these. other ideas?",
    "still no. show me different ones",
)
_DECADE_WORDS = {1920: "twenties", 1930: "thirties", 1940: "forties", 1950: "fifties", 1960: "sixties",
                 1970: "seventies", 1980: "eighties", 1990: "nineties"}


@dataclass
class SimulatedUser:
    """Holds the hidden target; speaks only in attributes of it."""

    user_id: str
    opening_titles: list[str]
    target: str = field(repr=False)
    hints: list[str] = field(default_factory=list)
    opening_template: str = OPENINGS[0]
    fallback: str = FALLBACKS[0]

    def opening(self) -> str:
        if len(self.opening_titles) < 2:
            return f"I liked {' and '.join(self.opening_titles)}. What should I watch next?"
        return self.opening_template.format(a=self.opening_titles[0], b=self.opening_titles[1])

    def answer(self, turn: int) -> str:
        """The message for turn ``turn`` (2, 3, ...) after a miss."""
        i = turn - 2
        return self.hints[i] if i < len(self.hints) else self.fallback


def _keyword(description: str, title: str) -> str | None:
    title_words = {w.lower() for w in re.findall(r"[\w']+", title)}
    words = [
        w for w in re.findall(r"[A-Za-z]{5,}", description) if w.lower() not in _STOP and w.lower() not in title_words
    ]
    return max(words, key=len).lower() if words else None


def make_user(catalog: Catalog, case: Case, seed: int = 0) -> SimulatedUser:
    """The simulated user of ``case``; its phrasing is drawn from the templates with a generator seeded by
    ``seed`` and the user's id (both agents meet the same messages)."""
    rng = random.Random(f"{seed}:{case.user_id}")
    target = catalog.item(case.target)
    visible = [i for i in dict.fromkeys(reversed(case.history)) if i != case.target][:2]
    titles = [str(catalog.item(i)["title"]) for i in visible]
    hints = []
    genres = [str(g) for g in target["genres"]]  # type: ignore[attr-defined]
    described = [g for g in genres if g in GENRE_DESCRIPTIONS]
    if described and rng.random() < DESCRIBED_SHARE:  # the first genre it has words for, described
        hints.append(rng.choice(DESCRIBED_HINTS).format(p1=rng.choice(GENRE_DESCRIPTIONS[described[0]])))
    elif genres and genres != ["unknown"]:
        low = [g.lower() for g in genres]
        if len(low) >= 2:
            hints.append(rng.choice(GENRE_HINTS).format(g1=low[0], g2=low[1]))
        else:
            hints.append(rng.choice(GENRE_HINTS_ONE).format(g1=low[0]))
    year = target["year"]
    if isinstance(year, int):
        d = year // 10 * 10
        templates = [t for t in DECADE_HINTS if "{dw}" not in t or d in _DECADE_WORDS]
        hints.append(rng.choice(templates).format(d=d, dd=f"{d % 100:02d}", dw=_DECADE_WORDS.get(d, ""), d9=d + 9))
    keyword = _keyword(str(target["description"]), str(target["title"]))
    if keyword:
        hints.append(rng.choice(KEYWORD_HINTS).format(kw=keyword))
    if len(genres) > 2:
        hints.append(rng.choice(EXTRA_GENRE_HINTS).format(g3=genres[2].lower()))
    return SimulatedUser(user_id=case.user_id, opening_titles=titles, target=case.target, hints=hints,
                         opening_template=rng.choice(OPENINGS), fallback=rng.choice(FALLBACKS))


@dataclass
class Episode:
    user_id: str
    success_turn: int | None
    turns: int
    ms: list[float]
    decided_by: list[str]
    degraded: int
    llm_genres: list[bool] = field(default_factory=list)  # per turn whose genre the LLM read: one of the target's?


def run_episode(agent: ChatAgent, user: SimulatedUser, max_turns: int) -> Episode:
    session: str | None = None
    ms, decided, degraded = [], [], 0
    read: list[bool] = []
    message = user.opening()
    for turn in range(1, max_turns + 1):
        t0 = time.perf_counter()
        result = agent.respond(session, message)  # the agent never sees user.target
        ms.append((time.perf_counter() - t0) * 1000)
        session = result.session_id
        decided.append(result.decided_by)
        degraded += int(result.degraded)
        genres = (result.intent or {}).get("genres")
        if result.decided_by in ("llm", "both") and isinstance(genres, list) and genres:
            target = agent.catalog.item(user.target)["genres"]
            read.append(bool(set(genres) & set(target if isinstance(target, list) else [])))
        if user.target in {i.item_id for i in result.items}:
            return Episode(user.user_id, turn, turn, ms, decided, degraded, read)
        message = user.answer(turn + 1)
    return Episode(user.user_id, None, max_turns, ms, decided, degraded, read)


def sample_users(catalog: Catalog, n_users: int, seed: int = 0, spec: SplitSpec | None = None,
                 part: Literal["validation", "test"] = "test") -> list[SimulatedUser]:
    """Seeded users of the split ``spec`` makes (default: ties in time by a random order seeded by ``seed``), with
    the targets of ``part`` (validation: for choosing the agent's settings; test: for reporting)."""
    split = split_catalog(catalog, spec or SplitSpec(seed=seed))
    cases = [c for c in split.cases(part) if len({i for i in c.history if i != c.target}) >= 2]
    rng = random.Random(seed)
    chosen = rng.sample(cases, min(n_users, len(cases)))
    return [make_user(catalog, c, seed=seed) for c in chosen]


def summarise_agent(episodes: list[Episode], max_turns: int, n_boot: int) -> dict[str, Any]:
    success = np.array([e.success_turn is not None for e in episodes], dtype=np.float64)
    turns = np.array([e.success_turn for e in episodes if e.success_turn is not None], dtype=np.float64)
    lo, hi = bootstrap_ci(success, n_boot=n_boot)
    tlo, thi = bootstrap_ci(turns, n_boot=n_boot)
    ms = [m for e in episodes for m in e.ms]
    return {
        f"success@{max_turns}": {"mean": float(success.mean()) if success.size else float("nan"), "lo": lo, "hi": hi},
        "turns_to_success": {
            "mean": float(turns.mean()) if turns.size else float("nan"),
            "lo": tlo,
            "hi": thi,
            "n": int(turns.size),
        },
        "success_by_turn": [
            float(np.mean([e.success_turn is not None and e.success_turn <= t for e in episodes]))
            for t in range(1, max_turns + 1)
        ],
        "ms_per_turn": {"mean": float(np.mean(ms)) if ms else 0.0, "p95": float(np.percentile(ms, 95)) if ms else 0.0},
        "decided_by": dict(Counter(d for e in episodes for d in e.decided_by)),
        "degraded_turns": sum(e.degraded for e in episodes),
        "llm_genre_turns": {"turns": sum(len(e.llm_genres) for e in episodes),
                            "in_target_genres": sum(sum(e.llm_genres) for e in episodes)},
    }


def evaluate_chat(
    service: RecommenderService,
    n_users: int = 30,
    max_turns: int = 5,
    seed: int = 0,
    n_boot: int = 1000,
    k: int = 5,
    progress: Any = None,
    spec: SplitSpec | None = None,
    part: Literal["validation", "test"] = "test",
    settings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Both agents over the same simulated users; returns the report payload. ``spec``: the split (default: ties
    in time by a random order seeded by ``seed``); ``part``: whose targets the users hold (CF is fitted without
    them); ``settings``: :class:`ChatConfig` fields both agents take (a setting being chosen on validation)."""
    catalog = service.catalog
    spec = spec or SplitSpec(seed=seed)
    split = split_catalog(catalog, spec)
    service.retriever = service.index.retriever("fused", cf=service.index.fit_cf(split.fit_histories(part)))
    users = sample_users(catalog, n_users, seed=seed, spec=spec, part=part)
    chosen = dict(settings or {})
    agents: dict[str, ChatConfig] = {
        # reasons do not change which items are shown, and success is all this measures: skip writing them
        "llm_agent": ChatConfig(k=k, use_llm=True, llm_explain=False, **chosen),
        "retrieval_only": ChatConfig(k=k, use_llm=False, **chosen),
    }
    if service.backend is None:
        agents.pop("llm_agent")
    episodes: dict[str, list[Episode]] = {}
    with tempfile.TemporaryDirectory(prefix="chat-eval-") as tmp:
        for name, config in agents.items():
            agent = ChatAgent(service, SQLiteSessionStore(Path(tmp) / f"{name}.sqlite"), config)
            episodes[name] = []
            for user in users:
                episodes[name].append(run_episode(agent, user, max_turns))
                if progress is not None:
                    progress(name, len(episodes[name]), len(users))
    results = {name: summarise_agent(eps, max_turns, n_boot) for name, eps in episodes.items()}
    payload: dict[str, Any] = {
        "catalog": catalog.name,
        "users": len(users),
        "max_turns": max_turns,
        "k": k,
        "seed": seed,
        "split": spec.provenance(),
        "part": part,
        "settings": chosen,
        "model": service.backend.model_name if service.backend else None,
        "results": results,
    }
    if "llm_agent" in episodes:
        a = np.array([e.success_turn is not None for e in episodes["llm_agent"]], dtype=np.float64)
        b = np.array([e.success_turn is not None for e in episodes["retrieval_only"]], dtype=np.float64)
        mean, lo, hi = paired_bootstrap_diff(a, b, n_boot=n_boot)
        payload["success_diff_llm_minus_retrieval"] = {"mean": mean, "lo": lo, "hi": hi}
    payload["episodes"] = {name: [e.__dict__ for e in eps] for name, eps in episodes.items()}
    return payload


def markdown(payload: dict[str, Any], notes: list[str], extra: list[str] | None = None) -> str:
    """The report; ``extra``: lines put before the notes (the held-out section)."""
    t = payload["max_turns"]
    lines = [
        f"# Chat evaluation (simulated users): {payload['catalog']}",
        "",
        f"{payload['users']} simulated users holding {payload.get('part', 'test')} targets, up to {t} turns, "
        f"{payload['k']} picks per turn"
        + (f"; settings {payload['settings']}." if payload.get("settings") else "."),
        "",
        f"| agent | success@{t} [95% CI] | turns to success [95% CI] | success by turn | ms/turn (mean, p95) |",
        "|---|---|---|---|---|",
    ]
    for name, r in payload["results"].items():
        s, tt = r[f"success@{t}"], r["turns_to_success"]
        curve = " / ".join(f"{v:.2f}" for v in r["success_by_turn"])
        lines.append(
            f"| {name} | {s['mean']:.3f} [{s['lo']:.3f}, {s['hi']:.3f}] | {tt['mean']:.2f} "
            f"[{tt['lo']:.2f}, {tt['hi']:.2f}] (n={tt['n']}) | {curve} | "
            f"{r['ms_per_turn']['mean']:.0f}, {r['ms_per_turn']['p95']:.0f} |"
        )
    if "success_diff_llm_minus_retrieval" in payload:
        d = payload["success_diff_llm_minus_retrieval"]
        lines += [
            "",
            f"Paired difference in success@{t} (LLM agent - retrieval only): {d['mean']:+.3f} "
            f"[{d['lo']:+.3f}, {d['hi']:+.3f}]",
        ]
    lines += [
        "",
        "Intent decided by (turns): "
        + "; ".join(f"{name}: {r['decided_by']}" for name, r in payload["results"].items()),
        "",
    ]
    reads = {name: r["llm_genre_turns"] for name, r in payload["results"].items()
             if r.get("llm_genre_turns", {}).get("turns")}
    if reads:
        lines += [
            "Genres the LLM read in the users' words (agent.chat.genre_reader; its prompt and margin were chosen on "
            "the reader's own development set, not on these users): "
            + "; ".join(f"{name}: {g['turns']} turns, the genre read is one of the hidden target's genres in "
                        f"{g['in_target_genres']}" for name, g in reads.items()),
            "",
        ]
    lines += list(extra or [])
    lines += ["## Notes", ""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"

"""Words the rules understand: genre synonyms (several languages, a little), cues for likes, dislikes,
negation, eras, questions and attempts to rewrite the instructions."""

from __future__ import annotations

import re

# canonical (MovieLens-style) genre -> words and phrases that mean it
GENRE_SYNONYMS: dict[str, tuple[str, ...]] = {
    "Horror": (
        "horror",
        "horrors",
        "scary",
        "scare",
        "scares",
        "frightening",
        "creepy",
        "spooky",
        "terrifying",
        "gory",
        "gore",
        "slasher",
        "slashers",
        "terror",
        "horreur",
        "miedo",
        "gruselig",
    ),
    "Comedy": (
        "comedy",
        "comedies",
        "funny",
        "funnier",
        "hilarious",
        "laugh",
        "laughs",
        "lighthearted",
        "light-hearted",
        "comedia",
        "comédie",
        "komödie",
    ),
    "Romance": ("romance", "romances", "romantic", "romcom", "rom-com", "love story", "love stories"),
    "Sci-Fi": (
        "sci-fi",
        "scifi",
        "sci fi",
        "science fiction",
        "science-fiction",
        "space",
        "futuristic",
        "ciencia ficción",
    ),
    "Animation": ("animation", "animated", "cartoon", "cartoons", "anime", "animación", "dessin animé"),
    "Children's": ("children's", "childrens", "children", "kids", "kid", "family", "kid-friendly"),
    "Action": ("action", "action-packed", "explosions"),
    "Adventure": ("adventure", "adventures", "aventura"),
    "Crime": ("crime", "crimes", "gangster", "gangsters", "mafia", "heist", "heists"),
    "Documentary": ("documentary", "documentaries", "docs"),
    "Drama": ("drama", "dramas", "dramatic", "sad", "depressing", "tearjerker", "tearjerkers", "heavy"),
    "Fantasy": ("fantasy", "fantasies", "magical", "magic", "fairy tale", "fairy tales", "fairy-tale"),
    "Film-Noir": ("noir", "film-noir", "film noir"),
    "Musical": ("musical", "musicals"),
    "Mystery": ("mystery", "mysteries", "whodunit", "whodunits"),
    "Thriller": ("thriller", "thrillers", "suspense", "suspenseful", "tense"),
    "War": ("war", "wartime", "war movies", "guerra"),
    "Western": ("western", "westerns", "cowboy", "cowboys"),
}
# words that stand for several genres
MULTI_GENRE: dict[str, tuple[str, ...]] = {
    "violent": ("Horror", "War"),
    "violence": ("Horror", "War"),
    "bloody": ("Horror", "War"),
    "dark": ("Horror", "Film-Noir"),
}

# title text runs to the end of the sentence; initials ("E.T.") and "Mr." do not end it
_TITLE_CHARS = r"(?:[^.;!?\n]|(?<=\b[A-Z])\.|(?<=Mr)\.|(?<=Mrs)\.|(?<=Dr)\.|(?<=St)\.|(?<=Jr)\.|(?<=vs)\.)+"
NEGATION = re.compile(
    r"\b(no|nothing|not|without|avoid|skip|hate|hated|dislike|never|none|less|fewer|except|anything but|"
    r"don't want|dont want|do not want|no more|not into|nada|sin|sans|pas de|kein|keine|ohne)\b",
    re.I,
)
DISLIKE_CUE = re.compile(
    r"\b(?:i\s+)?(?:really\s+)?(?:hated|hate|disliked|dislike|didn't like|didnt like|did not like|don't like|"
    r"dont like|do not like|can't stand|cannot stand|couldn't stand|was bored by)\s+(?P<body>" + _TITLE_CHARS + r")",
    re.I,
)
LIKE_CUE = re.compile(
    r"(?<!would )(?<!'d )\b(?:i\s+)?(?:really\s+|absolutely\s+|also\s+|totally\s+)?"
    r"(?:loved|love|liked|like|enjoyed|enjoy|adored|adore|adoré|aimé|encantó|encanta|mochte|liebe|"
    r"big fan of|fan of|more like|something like|anything like|similar to|movies like|films like|"
    r"more films like|more movies like)\s+(?P<body>" + _TITLE_CHARS + r")",
    re.I,
)
# bodies of a like-cue that are not titles ("I'd like something ...", "like to watch ...")
NOT_TITLE_START = re.compile(
    r"^(something|some|a|an|to|it|that|this|those|these|them|more|anything|films?|"
    r"movies?|watching|when|how|what|the idea|one)\b",
    re.I,
)
BODY_STOP = re.compile(
    r"(?:,\s*|\s+)(?:but|nothing|no|not|without|except|please|tonight|now|today|so|because|and\s+(?:nothing|no|"
    r"not|i|something|anything|want|would|maybe)|something|anything|i\s+want|i'd|maybe|preferably|"
    r"can you|could you|any|pas|sin|nada|kein|keine|ohne|sans|nichts)\b",
    re.I,
)
FILLER_TAIL = re.compile(
    r"\s+(?:so much|a lot|very much|a bunch|too|as well|lately|recently|the most|"
    r"movies?|films?|the movie|the film)$",
    re.I,
)

INJECTION = re.compile(
    r"(ignore|disregard|forget|override)\b.{0,40}\b(rules|instructions|prompt|guidelines|above|previous)|"
    r"system\s*prompt|your\s+(instructions|prompt|rules)|developer\s+mode|jailbreak|you are now|"
    r"reveal\b.{0,30}\b(prompt|instructions)|print\b.{0,30}\b(prompt|instructions)",
    re.I,
)
SMALLTALK = re.compile(
    r"^\s*(hi|hello|hey|hiya|yo|thanks|thank you|thx|cheers|ok|okay|cool|great|nice|bye|goodbye|good night|"
    r"how are you|who are you|what can you do|help|bonjour|hola|hallo|merci|gracias|danke)\b[\s\w!.?,']*$",
    re.I,
)
WHY = re.compile(
    r"\bwhy\b(?:\s+(?:did|do|would|have)\s+you\s+(?:recommend|suggest|pick|choose|show|propose)"
    r"(?:ed)?)?(?:\s+(?:me|us))?\s*(?P<t>[^?!.]*)",
    re.I,
)
ABOUT = re.compile(
    r"\b(?:what(?:'s| is| was)\s+(?P<a>.+?)\s+about|tell me (?:more )?about\s+(?P<b>[^?!.]+)|"
    r"describe\s+(?P<c>[^?!.]+)|what kind of (?:film|movie) is\s+(?P<d>[^?!.]+))",
    re.I,
)
THAT_ONE = re.compile(
    r"^(?:that|this|it|that one|this one|the first one|the first|the top one|"
    r"number one|#?1)?\s*(?:one)?\s*$",
    re.I,
)
REJECT = re.compile(
    r"\b(?:not|no)\s+(?:that|this)(?:\s+one)?\b|\bseen (?:it|that|this)\b|\balready seen\b|"
    r"\bnot for me\b|\bnot interested\b|\bskip (?:that|this|it)\b|\bdrop (?:that|this|it)\b",
    re.I,
)
REJECT_TITLE = re.compile(r"\b(?:not|no|skip|drop|remove)\s+(?P<t>[A-Z0-9][^,.;!?]{2,60})")
OLDER = re.compile(
    r"\b(older|earlier|classics?|old ones?|old films|old movies|less recent|vintage|"
    r"not so new|before that)\b",
    re.I,
)
NEWER = re.compile(r"\b(newer|more recent|recent ones?|modern|latest|new ones?|newer ones?|less old)\b", re.I)
DECADE = re.compile(r"\b(?:the\s+)?'?(?P<d>(?:19|20)\d0|\d0)'?s\b", re.I)
BEFORE = re.compile(r"\b(?:before|until|up to|prior to)\s+(?P<y>(?:19|20)\d\d)\b", re.I)
AFTER = re.compile(r"\b(?:after|since|from)\s+(?P<y>(?:19|20)\d\d)\b", re.I)
MOOD = re.compile(
    r"\b(?:in the mood for|feel like|feeling like|looking for|i want|i'd like|i would like|"
    r"something|anything|give me)\s+(?P<m>[^.;!?\n]+)",
    re.I,
)
STOPWORDS = {
    "a",
    "an",
    "the",
    "some",
    "something",
    "anything",
    "film",
    "films",
    "movie",
    "movies",
    "please",
    "tonight",
    "to",
    "watch",
    "with",
    "and",
    "or",
    "of",
    "for",
    "me",
    "i",
    "is",
    "it",
    "that",
    "this",
    "more",
    "less",
    "bit",
    "little",
    "one",
    "ones",
    "kind",
    "sort",
    "really",
    "very",
    "quite",
    "just",
    "also",
    "again",
    "now",
    "good",
    "nice",
    "new",
    "else",
    "different",
    "maybe",
    "like",
    "from",
    "in",
    "on",
    "at",
    "be",
    "not",
    "no",
    "nothing",
    "want",
    "would",
    "watching",
    "today",
    "later",
    "else.",
    "other",
    "thing",
    "stuff",
}
MORE = re.compile(
    r"\b(more|others?|something else|anything else|none of (?:those|these|them)|another|again|"
    r"next|keep going|go on|encore|otra|otras|autre|autres|weitere)\b",
    re.I,
)

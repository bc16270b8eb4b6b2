"""Words the rules understand: genre synonyms (several languages, a little), cues for likes, dislikes,
negation, eras, questions and attempts to rewrite the instructions."""

from __future__ import annotations

import re

from retrieval.item_text import YEAR_DIGITS

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
    "Crime": ("crime", "crimes", "gangster", "gangsters", "mafia", "mob", "mobster", "mobsters", "heist", "heists"),
    "Documentary": ("documentary", "documentaries", "docs"),
    "Drama": ("drama", "dramas", "dramatic", "sad", "depressing", "tearjerker", "tearjerkers", "heavy"),
    "Fantasy": ("fantasy", "fantasies", "magical", "magic", "fairy tale", "fairy tales", "fairy-tale", "sorcery"),
    "Film-Noir": ("noir", "film-noir", "film noir"),
    "Musical": ("musical", "musicals", "sing-along", "singalong"),
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
# moods: comparatives and feelings that re-rank softly (the items with these genres move up among the candidates;
# nothing is filtered). A genre word after "more" ("more westerns") is a mood of that genre too.
MOODS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(
        ("funnier", "more fun", "more funny", "more comedic", "more humour", "more humor", "more humorous",
         "sillier", "goofier", "wittier", "more laughs"),
        ("Comedy",),
    ),
    **dict.fromkeys(
        ("lighter", "less serious", "more light-hearted", "more lighthearted", "happier", "more upbeat", "upbeat",
         "more cheerful", "cheerful", "feel-good", "feel good", "pick-me-up", "pick me up", "cheer me up",
         "uplifting", "more uplifting", "brighter", "sunnier", "gentler", "cosier", "cozier", "sweeter",
         "wholesome", "more wholesome"),
        ("Comedy", "Romance", "Musical"),
    ),
    **dict.fromkeys(
        ("darker", "grittier", "bleaker", "edgier", "grimmer", "more sinister", "more disturbing", "moodier",
         "more twisted", "nastier", "more menacing"),
        ("Thriller", "Crime", "Film-Noir", "Horror"),
    ),
    **dict.fromkeys(
        ("scarier", "creepier", "spookier", "more frightening", "more terrifying", "more scary", "more scares",
         "more creepy", "more spooky", "more chilling", "eerier"),
        ("Horror", "Thriller"),
    ),
    **dict.fromkeys(
        ("more romantic", "more romance", "more love", "lovey-dovey", "more of a love story", "swoonier"),
        ("Romance",),
    ),
    **dict.fromkeys(
        ("more exciting", "more thrilling", "more suspense", "more suspenseful", "more tense", "tenser",
         "more gripping", "more intense", "more of a thrill", "more thrills", "edge of my seat"),
        ("Thriller", "Action"),
    ),
    **dict.fromkeys(
        ("more action", "more action-packed", "more explosive", "more explosions", "more fights", "more fighting",
         "faster-paced", "faster paced", "more adrenaline", "punchier"),
        ("Action",),
    ),
    **dict.fromkeys(
        ("sadder", "more emotional", "more moving", "more serious", "deeper", "more dramatic", "more thought-provoking",
         "more meaningful", "weightier", "heavier", "more of a tearjerker"),
        ("Drama",),
    ),
    **dict.fromkeys(
        ("more epic", "more adventurous", "more of an adventure", "grander", "more swashbuckling"),
        ("Adventure", "Action"),
    ),
    **dict.fromkeys(
        ("weirder", "stranger", "trippier", "more surreal", "more mind-bending", "more bizarre", "more out there"),
        ("Sci-Fi", "Fantasy", "Mystery"),
    ),
    **dict.fromkeys(("more magical", "more whimsical", "more fantastical", "dreamier"), ("Fantasy", "Children's")),
    **dict.fromkeys(
        ("more mysterious", "more puzzling", "more of a whodunit", "twistier", "more twists", "more twisty"),
        ("Mystery", "Thriller"),
    ),
    **dict.fromkeys(
        ("more family-friendly", "more family friendly", "more kid-friendly", "more child-friendly", "tamer",
         "milder"),
        ("Children's", "Animation", "Comedy"),
    ),
    **dict.fromkeys(("more songs", "more music", "more singing", "with songs", "songs in it"), ("Musical",)),
}
# English words one edit away from a genre synonym, so never read as its typo (from an English word list)
NOT_TYPOS = {
    "auction", "cares", "cries", "crimea", "crises", "error", "faction", "factions", "grimes", "guerre", "lobster",
    "mastery", "monster", "monsters", "scales", "scarce", "scars", "scores", "shares", "stares", "spaced", "spaces",
    "tensed", "thrilled", "ventura", "violet", "slashed", "series", "lovers",
}
MOOD_PATTERN = re.compile(
    r"(?<![\w-])(" + "|".join(re.escape(w) for w in sorted(MOODS, key=len, reverse=True)) + r")(?![\w-])", re.I
)

# title text runs to the end of the sentence; initials ("E.T.") and "Mr." do not end it
_TITLE_CHARS = r"(?:[^.;!?\n]|(?<=\b[A-Z])\.|(?<=Mr)\.|(?<=Mrs)\.|(?<=Dr)\.|(?<=St)\.|(?<=Jr)\.|(?<=vs)\.)+"
NEGATION = re.compile(
    r"\b(no|nothing|not|without|avoid|skip|hate|hated|dislike|never|none|less|fewer|except|anything but|"
    r"don't want|dont want|do not want|no more|not into|nada|sin|sans|pas de|kein|keine|ohne)\b|n't\b",
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
    r"more films like|more movies like|stuff like|ones like|along the lines of|in the vein of|in the spirit of|"
    r"reminiscent of|in the style of|(?:the )?same vibe as|comparable to|akin to|à la|a la)\s+(?P<body>"
    + _TITLE_CHARS + r")",
    re.I,
)
# bodies of a like-cue that are not titles ("I'd like something ...", "like to watch ...")
NOT_TITLE_START = re.compile(
    r"^(something|some|a|an|to|it|that|this|those|these|them|more|anything|films?|"
    r"movies?|watching|when|how|what|the idea|one|both|all|each|every|everything)\b",
    re.I,
)
BODY_STOP = re.compile(
    r"(?:(?:,\s*|\s+)(?:but|nothing|no|not|without|except|please|tonight|now|today|so|because|and\s+(?:nothing|no|"
    r"not|i|something|anything|want|would|maybe)|something|anything|i\s+want|i'd|maybe|preferably|"
    r"can you|could you|any|pas|sin|nada|kein|keine|ohne|sans|nichts)|"
    r",\s*(?:what|which|how|who|where|would|could|can|should|will|do|does|is there|are there|got|and what)|"
    r"\s+[-–—]+\s+)\b",
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
    r"\bwhy(?:'d|’d)?\b(?!\s+not\b)(?:\s+(?:(?:did|do|would|should|will|have|might|could)\s+)?(?:you|u|i|we)\s+"
    r"(?:(?:have\s+)?(?:recommend|suggest|pick|choose|chose|show|propose|like|enjoy|love|want|went with|go with|"
    r"include|put)(?:ed|d)?))?(?:\s+(?:me|us))?\s*(?P<t>[^?!.]*)",
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
    r"not so new|not as new|not so recent|not as recent|before that)\b",
    re.I,
)
NEWER = re.compile(
    r"\b(newer|more recent|recent ones?|modern|latest|new ones?|newer ones?|less old|not as old|not so old|"
    r"not that old|less dated)\b",
    re.I,
)
DECADE = re.compile(r"\b(?:the\s+)?'?(?P<d>(?:19|20)\d0|\d0)'?s\b", re.I)
#: decades in words ("the nineties") -> their first year
DECADE_WORDS = {"twenties": 1920, "thirties": 1930, "forties": 1940, "fifties": 1950, "sixties": 1960,
                "seventies": 1970, "eighties": 1980, "nineties": 1990}
DECADE_WORD = re.compile(r"\b(?:the\s+)?(?:nineteen[- ]?)?(?P<w>" + "|".join(DECADE_WORDS) + r")\b", re.I)
# a year or a decade (as digits or words) after a bound
_WHEN = r"(?:the\s+)?(?P<y>" + YEAR_DIGITS + r"(?!s)|'?(?:(?:19|20)\d0|\d0)'?s|" + "|".join(DECADE_WORDS) + r")"
BEFORE = re.compile(r"\b(?:before|until|up to|prior to|pre-?|earlier than|older than)\s*" + _WHEN + r"\b", re.I)
AFTER = re.compile(r"\b(?:after|since|post-?|later than|newer than)\s*" + _WHEN + r"\b", re.I)
#: "from 1994" / "made in 1994": that year; "from 1994 on": from it
FROM_YEAR = re.compile(
    r"\b(?:from|in|made in|released in|of)\s+(?P<y>" + YEAR_DIGITS + r")\b(?!s)"
    r"(?P<on>\s*(?:on(?:wards?)?\b|and (?:later|after|up|newer)\b|or (?:later|after|newer)\b|\+))?",
    re.I,
)
YEAR_RANGE = re.compile(
    r"\b(?:between\s+|from\s+)?(?P<a>" + YEAR_DIGITS + r")\s*(?:-|–|to|and|until|till|through)\s*(?P<b>"
    + YEAR_DIGITS + r")\b",
    re.I,
)
#: genre words after these (in their clause) are hard constraints that outlive a new reference item
STRICT = re.compile(
    r"\b(?:must|has to|have to|needs? to|gotta|got to|only|strictly|exclusively|nothing but|required?)\b", re.I
)
#: a like-cue that asks for similar items ("something like X", "in the vein of X") rather than stating a like
REFERENCE_CUE = re.compile(
    r"^(?:like|more like)$|\b(?:something|anything|stuff|movies?|films?|ones?|similar|vein|spirit|lines|"
    r"reminiscent|style|vibe|comparable|akin|à la|a la)\b",
    re.I,
)
#: "more like that", "similar": titles found in the message without a cue are references
SIMILAR_HINT = re.compile(
    r"\b(?:similar|(?:more|something|anything|stuff|ones?)\s+like\s+(?:that|this|it)|in the (?:vein|spirit) of)\b",
    re.I,
)
#: critiques of the whole last list ("forget those", "ignore the previous suggestions"): not injection attempts
_LIST = (r"(?:suggestions?|picks?|recommendations?|recs|ones|films|movies|titles|list|options|results|choices|"
         r"batch|lot)")
_EARLIER = r"(?:previous|last|earlier|above|prior|first|old|other|current)"
_NOT_ORDERS = r"(?!\s+(?:rules|instructions|guidelines|prompts?|directions|orders|commands|settings))"
REJECT_ALL = re.compile(
    r"\b(?:none of (?:those|these|them|that)|not (?:those|these|them)\b|neither of (?:those|these|them)|"
    r"(?:forget|ignore|disregard|scrap|ditch|drop|skip|toss|bin)\s+(?:about\s+)?(?:all\s+)?(?:of\s+)?"
    r"(?:those|these|them|that lot|that list|all that)\b" + _NOT_ORDERS + r"|"
    r"(?:forget|ignore|disregard|scrap|ditch|drop|skip|toss|bin)\s+(?:about\s+)?(?:all\s+)?(?:of\s+)?"
    r"(?:(?:the|those|these|your|my|that|this)\s+(?:" + _EARLIER + r"\s+)?|" + _EARLIER + r"\s+)" + _LIST + r")\b",
    re.I,
)
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
    # filler of requests (so that it never becomes the free-text query)
    "but",
    "before",
    "after",
    "since",
    "until",
    "than",
    "whole",
    "can",
    "could",
    "you",
    "your",
    "made",
    "got",
    "any",
    "ok",
    "okay",
    "pls",
    "plz",
    "though",
    "even",
    "too",
    "if",
    "possible",
    "ideally",
    "actually",
    "either",
    "those",
    "these",
    "them",
    "what",
    "about",
    "are",
    "was",
    "has",
    "have",
    "should",
    "find",
    "show",
    "give",
    "recommend",
    "suggest",
    "see",
    "get",
    "need",
    "type",
    "era",
    "year",
    "years",
    "decade",
    "lot",
    "much",
    "things",
    "as",
    "so",
    "all",
    "old",
    "still",
    "nope",
    "yes",
    "idea",
    "ideas",
    "instead",
    "try",
    "look",
    "looks",
    "must",
    "needs",
    "only",
    "strictly",
}
#: genre words that also lean to another genre ("romcom": a Romance, preferably a Comedy)
GENRE_LEANS: dict[str, tuple[str, ...]] = {
    "romcom": ("Comedy",),
    "romcoms": ("Comedy",),
    "rom-com": ("Comedy",),
    "rom-coms": ("Comedy",),
    "romantic comedy": ("Comedy",),
    "romantic comedies": ("Comedy",),
}
GENRE_LEAN = re.compile(r"(?<![\w-])(" + "|".join(re.escape(w) for w in GENRE_LEANS) + r")(?![\w-])", re.I)
# an item of the last list by its position, said anywhere ("what's it about, the second one?")
POSITION = re.compile(
    r"\b(?:the\s+)?(?:first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|last|\d{1,2}(?:st|nd|rd|th)|"
    r"(?:number|no\.?|#)\s*\d{1,2})(?:\s+(?:one|pick|film|movie|suggestion))?\b",
    re.I,
)
MORE = re.compile(
    r"\b(more|others?|something else|anything else|none of (?:those|these|them)|another|again|"
    r"next|keep going|go on|different (?:ones|films|movies|picks)|encore|otra|otras|autre|autres|weitere)\b",
    re.I,
)

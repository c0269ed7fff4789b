"""Task families on natural-language prompts whose gold reward is a program, so a study with a real pretrained model
(SmolLM2-135M, the ``real`` pipeline) is still scored exactly. They mirror two of the paper's settings the way
:mod:`roads.data.synthetic` does, but in English: prompts are instructions written from the small word lists below
(no download), responses are sentences, and everything is drawn deterministically from the study's seed.

``constraints`` (generation–verification gap present; the paper's full TL;DR summaries, as verifiable instructions)
    The prompt asks for one sentence under four checkable constraints (IFEval-style)::

        Write exactly 6 words, using "river" but not "quiet", ending with "!".

    r* = the fraction of the four constraints the response meets: (1) it has exactly N words (whitespace-separated, a
    bare punctuation mark is no word), (2) one of its words is W, (3) none of its words is V, (4) its last character
    is the end mark P. *Verifying* is a word count, two look-ups and a last character: four local checks, each a simple
    function of the response.
    *Generating* needs the whole plan: the count constraint fixes where the sentence must end before it starts (every
    word written changes how many are left, and the content words must fit around W without V), over a horizon of up to
    ``max_len`` words. The demonstrator does not plan: it writes a sentence of a length drawn uniformly from
    [``min_len``, ``max_len``] whatever N says, and picks its other words without regard to V (it does use W and P,
    with edit noise). So the demonstrations carry no information about the count or the avoided word — the
    demonstrator's likelihood of a response is the same whichever N and V the prompt names, and cannot express those
    terms of r* (as ``shuffle``'s random permutations cannot express order) — while the preference pairs, two such
    sentences labelled by r*, do carry them. Verifier simpler than generator.

``rouge`` (hidden-reference control; the paper's ROUGE-L TL;DR reward)
    The prompt is a sentence to rewrite "in the house style"::

        Rewrite in house style: the quiet river sees a small stone.

    r* is the ROUGE-L F1 (longest common subsequence over words, :func:`rouge_l_f1`) of the response against a
    hidden reference z(x): the sentence's content words (articles dropped), each replaced by its *house word*, ending
    with ".". The house table is a fixed pseudo-random permutation of each word list drawn from ``secret`` that keeps
    half of the list's words and renames the other half among themselves (so a copy of the source is half right, as
    a reference summary shares some of an article's words). Nothing in the prompt reveals which words are renamed or
    to what; only the data does (demonstrations are noisy copies of z(x)). Verifying a response needs exactly
    the knowledge generating it needs (the house word of every word of x), over the same horizon: the gap is closed
    from the verification side, as the paper's ROUGE-L reward against the hidden reference summary closed it.

The demonstrators take an edit probability ``noise`` (SFT data at ``prepare_data.demo_noise``, the behaviour policy
that draws preference pairs at ``behaviour_noise``): per word, with probability ``noise``, one random edit
(substitute a random word of the lists, delete, insert one, or swap with the next); ``constraints`` also replaces
the end mark with a random one with probability ``noise``.

Responses are written in lowercase words and ``.!?`` (``response_symbols``), so ``response_vocab: task`` keeps a
pretrained model's policy on one line of words (no newlines, digits or markup) and the tokenizer round-trips them.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from roads.data.synthetic import lcs_length, random_edits
from roads.errors import DataError

ADJECTIVES = ("quiet", "small", "green", "old", "bright", "cold", "happy", "tall", "dark", "soft", "quick", "brave",
              "calm", "wild", "warm", "little", "red", "blue", "gentle", "heavy", "proud", "lazy", "busy", "kind")
NOUNS = ("river", "stone", "bird", "house", "tree", "child", "dog", "cat", "boat", "road", "moon", "garden", "window",
         "teacher", "farmer", "apple", "cloud", "horse", "letter", "friend", "door", "hill", "song", "lamp")
VERBS = ("sees", "finds", "likes", "follows", "paints", "watches", "carries", "helps", "meets", "draws", "hears",
         "keeps", "loves", "opens", "calls", "visits")
ARTICLES = ("the", "a")
MARKS = (".", "!", "?")
WORDS = ADJECTIVES + NOUNS + VERBS + ARTICLES  # every word a demonstrator writes
FAMILIES = ("constraints", "rouge")
GAP_CLASS = {"constraints": "gap", "rouge": "closed (verification)"}
LETTERS = "abcdefghijklmnopqrstuvwxyz"

CONSTRAINTS_PROMPT = re.compile(r'^Write exactly (\d+) words, using "([a-z]+)" but not "([a-z]+)", ending with '
                                r'"([.!?])"\.\n$')
ROUGE_HEAD, ROUGE_TAIL = "Rewrite in house style: ", "\n"


class TextSettings(BaseModel):
    """The settings of the text families (``tasks.<name>``'s fields of the same names); strict as
    ``roads.settings.Strict``."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    family: Literal["constraints", "rouge"]
    min_len: int = Field(4, ge=3, description="constraints: fewest words asked for; rouge: shortest source sentence")
    max_len: int = Field(8, ge=3, le=30, description="constraints: most words asked for; rouge: longest source "
                                                    "sentence")
    secret: int = Field(1234, description="rouge: seed of the hidden house table")

    @model_validator(mode="after")
    def _lengths(self) -> "TextSettings":
        if self.min_len > self.max_len:
            raise ValueError(f"min_len ({self.min_len}) is larger than max_len ({self.max_len})")
        return self


def words_of(text: str) -> list[str]:
    """The words of a response for matching: lowercased, whitespace-separated, trailing and leading ``.!?,;:'"``
    stripped (empty leftovers dropped)."""
    out = []
    for raw in text.lower().split():
        word = raw.strip(".!?,;:'\"")
        if word:
            out.append(word)
    return out


def rouge_l_f1(reference: str, response: str) -> float:
    """ROUGE-L F1 over words (:func:`words_of`): with L the longest common subsequence of the two word lists,
    P = L/|response|, R = L/|reference| and F1 = 2PR/(P+R); 0 when either is empty or L = 0."""
    ref, hyp = words_of(reference), words_of(response)
    if not ref or not hyp:
        return 0.0
    lcs = lcs_length(ref, hyp)
    if lcs == 0:
        return 0.0
    p, r = lcs / len(hyp), lcs / len(ref)
    return 2 * p * r / (p + r)


def sentence(n: int, rng: random.Random, *, use: str | None = None) -> list[str]:
    """A sentence of exactly ``n`` >= 3 words from the word lists, no end mark: ``[the] adj* noun verb [the] adj* noun``
    (articles while there is room, the rest adjectives, split at random between the two nouns). ``use``: a noun or
    adjective it must contain."""
    nouns = [rng.choice(NOUNS), rng.choice(NOUNS)]
    verb = rng.choice(VERBS)
    articles = [rng.choice(ARTICLES) if n >= 4 else None, rng.choice(ARTICLES) if n >= 5 else None]
    extra = n - 3 - sum(a is not None for a in articles)
    first = rng.randint(0, extra)
    adjs = [[rng.choice(ADJECTIVES) for _ in range(first)], [rng.choice(ADJECTIVES) for _ in range(extra - first)]]
    if use in NOUNS:
        nouns[rng.randrange(2)] = use
    elif use in ADJECTIVES:
        slots = [(i, j) for i in range(2) for j in range(len(adjs[i]))]
        if slots:
            i, j = rng.choice(slots)
            adjs[i][j] = use
        else:  # no adjective slot (n == 3 or all articles): the adjective replaces an article, or a noun
            nouns[rng.randrange(2)] = use
    out: list[str] = []
    for i in range(2):
        if articles[i] is not None:
            out.append(articles[i])
        out += adjs[i]
        out.append(nouns[i])
        if i == 0:
            out.append(verb)
    assert len(out) == n
    return out


def edit_words(ys: list[str], noise: float, rng: random.Random) -> list[str]:
    """Per word, with probability ``noise``, one random edit: substitute a random word, delete, insert a random word
    before it, or swap it with the next."""
    return random_edits(ys, noise, rng, WORDS)


@dataclass(frozen=True)
class TextTask:
    """One natural-language family (``constraints`` or ``rouge``) and its sizes; see the module's docstring."""

    family: str
    min_len: int = 4
    max_len: int = 8
    secret: int = 1234

    # the TaskFamily protocol (roads.data.family)
    Settings: ClassVar[type] = TextSettings
    reward_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    response_symbols: ClassVar[str] = LETTERS + "".join(MARKS)

    @classmethod
    def from_settings(cls, settings) -> "TextTask":
        return cls(**settings.model_dump())

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise DataError(f"unknown text family {self.family!r}; choose one of {', '.join(FAMILIES)}")
        if not 3 <= self.min_len <= self.max_len:
            raise DataError(f"need 3 <= min_len <= max_len, got min_len={self.min_len} max_len={self.max_len}")

    @property
    def gap_class(self) -> str:
        return GAP_CLASS[self.family]

    # --- prompts ----------------------------------------------------------------------------------------------------
    def sample_prompt_symbols(self, rng: random.Random):
        """constraints: (N, W, V, P) — N words in [min_len, max_len], W a noun, V a noun or adjective other than W,
        P an end mark; rouge: the source sentence's words (``min_len``..``max_len`` of them, ending with ".")."""
        if self.family == "constraints":
            n = rng.randint(self.min_len, self.max_len)
            use = rng.choice(NOUNS)
            avoid = rng.choice([w for w in NOUNS + ADJECTIVES if w != use])
            return (n, use, avoid, rng.choice(MARKS))
        words = sentence(rng.randint(self.min_len, self.max_len), rng)
        return tuple(words[:-1]) + (words[-1] + ".",)

    def prompt(self, xs) -> str:
        if self.family == "constraints":
            n, use, avoid, mark = xs
            return f'Write exactly {n} words, using "{use}" but not "{avoid}", ending with "{mark}".\n'
        return f"{ROUGE_HEAD}{' '.join(xs)}{ROUGE_TAIL}"

    def parse_prompt(self, prompt: str):
        """The prompt object back from its text (what ``gold_reward`` scores against); DataError when it is not one."""
        if self.family == "constraints":
            match = CONSTRAINTS_PROMPT.match(prompt)
            if match is None:
                raise DataError(f"prompt {prompt!r} is not a 'constraints' prompt (expected 'Write exactly N words, "
                                "using ...')")
            return (int(match[1]), match[2], match[3], match[4])
        if not (prompt.startswith(ROUGE_HEAD) and prompt.endswith(ROUGE_TAIL)):
            raise DataError(f"prompt {prompt!r} is not a 'rouge' prompt (expected '{ROUGE_HEAD}...{ROUGE_TAIL!r}')")
        return tuple(prompt[len(ROUGE_HEAD): -len(ROUGE_TAIL)].split())

    @staticmethod
    def response(ys: list[str]) -> str:
        """The words, space-separated (the prompt ends with a newline, so the response starts with its first word)."""
        return " ".join(ys)

    # --- the hidden table (rouge) ------------------------------------------------------------------------------------
    def house_table(self) -> dict[str, str]:
        """Each adjective, noun and verb's house word: a permutation of its own list drawn from ``secret`` that keeps
        half of the words (drawn at random) and renames each of the others as the next of them in a random order (a
        cycle: every renamed word changes)."""
        rng = random.Random(self.secret)
        table: dict[str, str] = {}
        for words in (ADJECTIVES, NOUNS, VERBS):
            order = list(words)
            rng.shuffle(order)
            kept, renamed = order[: len(order) // 2], order[len(order) // 2:]
            table.update({w: w for w in kept})
            table.update({w: renamed[(i + 1) % len(renamed)] for i, w in enumerate(renamed)})
        return table

    def reference(self, xs) -> list[str]:
        """z(x) of ``rouge``: the content words of the source, each by its house word, the last ending with "."."""
        table = self.house_table()
        content = [table[w] for w in words_of(" ".join(xs)) if w in table]
        return content[:-1] + [content[-1] + "."] if content else []

    # --- the task ----------------------------------------------------------------------------------------------------
    def target(self, xs) -> list[str]:
        """A best response (r* = 1): ``constraints``: a sentence of exactly N words using W, never V, ending with P
        (one fixed sentence per prompt, drawn from a generator seeded by the prompt's text); ``rouge``: z(x)."""
        if self.family == "rouge":
            return self.reference(xs)
        n, use, avoid, mark = xs
        rng = random.Random(self.prompt(xs))
        for _ in range(1000):
            ys = sentence(n, rng, use=use)
            if avoid not in ys:
                return ys[:-1] + [ys[-1] + mark]
        raise DataError(f"no sentence of {n} words avoids {avoid!r}")  # pragma: no cover - needs 1000 unlucky draws

    def constraints_met(self, prompt: str, response: str) -> tuple[bool, bool, bool, bool]:
        """``constraints``: (exactly N words, uses W, avoids V, ends with P) for a response."""
        n, use, avoid, mark = self.parse_prompt(prompt)
        words = words_of(response)
        return (len(words) == n, use in words, avoid not in words, response.rstrip().endswith(mark))

    def gold_reward(self, prompt: str, response: str) -> float:
        """r*(x, y) in [0, 1]: ``constraints``: the fraction of the four constraints met; ``rouge``: ROUGE-L F1 against
        the hidden reference z(x)."""
        if self.family == "constraints":
            return sum(self.constraints_met(prompt, response)) / 4
        return rouge_l_f1(" ".join(self.reference(self.parse_prompt(prompt))), response)

    def demonstrate(self, xs, noise: float, rng: random.Random) -> list[str]:
        """The noisy demonstrator. ``constraints``: a sentence that uses W, of a length drawn uniformly from
        [min_len, max_len] whatever N is, its other words drawn without regard to V, ending with P; then the word edits,
        and with probability ``noise`` a random end mark. ``rouge``: z(x) with the word edits."""
        if self.family == "rouge":
            ys = [w.rstrip(".") for w in self.reference(xs)]
            ys = edit_words(ys, noise, rng) or [rng.choice(WORDS)]
            return ys[:-1] + [ys[-1] + "."]
        _, use, _, mark = xs
        ys = edit_words(sentence(rng.randint(self.min_len, self.max_len), rng, use=use), noise, rng)
        ys = ys or [rng.choice(WORDS)]
        if rng.random() < noise:
            mark = rng.choice(MARKS)
        return ys[:-1] + [ys[-1] + mark]

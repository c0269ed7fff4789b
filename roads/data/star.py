"""The ``star`` family: path-finding on a star graph (Bachmann & Nagarajan 2024, "The pitfalls of next-token
prediction"), a task whose generation–verification gap comes from a plan the demonstrations never show.

The prompt describes a star graph: a centre node with ``degree`` arms, each arm a chain of ``arm_len`` further nodes.
Node names are distinct letters drawn at random from the alphabet (so ``alphabet >= 1 + degree·arm_len``). The prompt
lists the directed edges "parent child" in a shuffled order, separated by commas, then names the centre and the goal
(a leaf)::

    path: d e , a b , a f , b c , a d , f g | a g ->

Every node is written as a space and its letter, in the edges as in the response, so the byte-level tokenizer gives
a node one token wherever it occurs (with ``u>v`` the child would be a different token from the same node in a
response, an arbitrary mapping for a tiny model to learn on top of the look-ups).

The response is the path from the centre to the goal, space-separated (``" a f g"``): the *target*, the one path
of the graph that starts at the centre and ends at the goal.

Why it has a gap. *Verifying* a response is local: its first symbol is the named centre, each step is an edge the
prompt lists, and the last symbol is the named goal — three kinds of look-up, each of one symbol pair, and a
response passes all of them exactly when it is the target. *Generating* it needs a plan: the very first decision
(which arm to leave the centre by) depends on which arm ends at the goal, which is found only by a look-up back
from the goal (goal → its parent → … → the centre's child), ``arm_len`` chained look-ups before the first symbol
after the centre can be written. The demonstrator does not make it: it picks an arm uniformly at random and walks
it to the end (with edit noise), never reading the goal. So the SFT demonstrations carry no information about which
arm reaches the goal, and the demonstrator's likelihood of a response is the same whichever leaf is the goal:
log π_demo cannot express r*. Preference pairs (two behaviour draws labelled by r*) do carry the plan signal.

Gold reward. With the target T = [c, t_1, …, t_L] (L = ``arm_len``) and a response y = [y_1, …, y_n]::

    r*(x, y) = ⅓·W + ⅔·P

* W, the *walk* score (local checks only): the number of valid steps over max(n, L + 1), where step 1 is valid when
  y_1 is the centre and step i > 1 when (y_{i−1}, y_i) is an edge of the prompt. W = 1 exactly for a complete walk from
  the centre to a leaf — down *any* arm. A symbol outside the graph (or the alphabet) is an invalid step; extra
  symbols cost through the denominator (a walk cannot be longer than L + 1 nodes).
* P, the *plan* score: how far along the target the response is right, past the centre: (ℓ − 1)⁺ / max(L, n − 1)
  with ℓ the length of the longest common prefix of y and T. P > 0 only if the response leaves the centre by the
  goal's arm; extra symbols cost here too.

Why these weights: a clean walk down the wrong arm scores ⅓ (W = 1, P = 0) and the target scores 1, so choosing the
right arm is worth ⅔ of the reward — most of it — while the walk score still gives partial credit for well-formed
responses (and a dense signal between two wrong-arm responses). A prefix (not a subsequence) match for P means that
copying the goal from the prompt earns nothing by itself: " c g" scores ⅓·⅓ + 0, below a clean wrong-arm walk.
r* is 1 exactly for the target (W = 1 and P = 1 force y = T) and lies in [0, 1].

The demonstrator (``demonstrate``) walks a uniformly random arm and then, at each position and with probability
``noise``, makes one random edit: substitute a random alphabet symbol, delete, or insert a random symbol before it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from typing import ClassVar, Literal

from pydantic import Field

from roads.data.synthetic import LETTERS, PROMPT_END, SymbolSettings, SyntheticTask, _VERBS
from roads.errors import DataError


class StarSettings(SymbolSettings):
    """The ``star`` family's settings (``tasks.<name>``'s fields of the same names)."""

    family: Literal["star"]
    alphabet: int = Field(12, ge=2, le=26, description="number of symbols (node names)")
    degree: int = Field(3, ge=2, description="arms leaving the centre of the graph")
    arm_len: int = Field(2, ge=1, description="nodes on each arm after the centre")

EDGE_SEP = " , "
GOAL_SEP = " | "


@dataclass(frozen=True)
class StarGraph:
    """One star-graph prompt: the centre, the directed edges (parent, child) in prompt order, and the goal leaf."""

    centre: str
    edges: tuple[tuple[str, str], ...]
    goal: str

    def children(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for parent, child in self.edges:
            out.setdefault(parent, []).append(child)
        return out

    def parents(self) -> dict[str, str]:
        return {child: parent for parent, child in self.edges}

    def arms(self) -> list[list[str]]:
        """Every arm as the nodes after the centre, in sorted order of each arm's first node (not prompt order)."""
        children = self.children()
        arms = []
        for first in sorted(children.get(self.centre, [])):
            arm = [first]
            while children.get(arm[-1]):
                arm.append(children[arm[-1]][0])
            arms.append(arm)
        return arms


@dataclass(frozen=True)
class StarTask(SyntheticTask):
    """The ``star`` family: ``degree`` arms of ``arm_len`` nodes each, named by distinct letters of the alphabet.

    ``min_len``, ``max_len`` and ``secret`` are unused (they are kept so a task config maps onto the same fields)."""

    family: str = "star"
    alphabet: int = 12
    degree: int = 3
    arm_len: int = 2

    Settings: ClassVar[type] = StarSettings

    def __post_init__(self):
        if self.family != "star":
            raise DataError(f"StarTask is the 'star' family, got family {self.family!r}")
        if self.degree < 2:
            raise DataError(f"star: degree must be at least 2 (arms leaving the centre), got {self.degree}")
        if self.arm_len < 1:
            raise DataError(f"star: arm_len must be at least 1 (nodes on each arm), got {self.arm_len}")
        nodes = 1 + self.degree * self.arm_len
        if not nodes <= self.alphabet <= len(LETTERS):
            raise DataError(
                f"star: alphabet {self.alphabet} cannot name the {nodes} nodes of a star with degree {self.degree} and "
                f"arm_len {self.arm_len} (1 + degree*arm_len); set alphabet between {nodes} and "
                f"{len(LETTERS)}, or lower degree or arm_len"
            )

    # --- text format -------------------------------------------------------------------------------------------
    def prompt(self, xs: StarGraph) -> str:
        edges = EDGE_SEP.join(f"{u} {v}" for u, v in xs.edges)
        return f"{_VERBS['star']}: {edges}{GOAL_SEP}{xs.centre} {xs.goal}{PROMPT_END}"

    def parse_prompt(self, prompt: str) -> StarGraph:
        head = f"{_VERBS['star']}: "

        def bad(why: str) -> DataError:
            return DataError(f"prompt {prompt!r} is not a 'star' prompt ({why}; expected '{head}u v , u v ... | centre goal ->')")

        if not (prompt.startswith(head) and prompt.endswith(PROMPT_END)):
            raise bad("wrong head or end")
        body = prompt[len(head) : -len(PROMPT_END)]
        if body.count(GOAL_SEP) != 1:
            raise bad(f"needs one {GOAL_SEP.strip()!r}")
        edge_text, ends = body.split(GOAL_SEP)
        edges = []
        for pair in edge_text.split(EDGE_SEP):
            parts = pair.split()
            if len(parts) != 2:
                raise bad(f"{pair!r} is not an edge 'u v'")
            edges.append((parts[0], parts[1]))
        names = ends.split()
        if len(names) != 2:
            raise bad("needs a centre and a goal after the edges")
        return StarGraph(names[0], tuple(edges), names[1])

    # --- the task ------------------------------------------------------------------------------------------------
    def target(self, xs: StarGraph) -> list[str]:
        """The path from the centre to the goal, found by walking back from the goal (the plan)."""
        parents = xs.parents()
        path = [xs.goal]
        while path[-1] != xs.centre:
            if path[-1] not in parents or len(path) > len(xs.edges):
                raise DataError(f"star: goal {xs.goal!r} is not reachable from centre {xs.centre!r}")
            path.append(parents[path[-1]])
        return path[::-1]

    def walk_score(self, xs: StarGraph, ys: list[str]) -> float:
        """W: valid steps (first symbol the centre, then listed edges) over max(len(ys), arm length + 1)."""
        if not ys:
            return 0.0
        edges = set(xs.edges)
        valid = (ys[0] == xs.centre) + sum((a, b) in edges for a, b in zip(ys, ys[1:]))
        return valid / max(len(ys), len(self.target(xs)))

    def plan_score(self, xs: StarGraph, ys: list[str]) -> float:
        """P: the common prefix with the target past the centre, over max(arm length, len(ys) − 1)."""
        target = self.target(xs)
        lcp = 0
        while lcp < min(len(ys), len(target)) and ys[lcp] == target[lcp]:
            lcp += 1
        return max(lcp - 1, 0) / max(len(target) - 1, len(ys) - 1)

    def gold_reward(self, prompt: str, response: str) -> float:
        """r*(x, y) = ⅓·W + ⅔·P in [0, 1]; 1 exactly when the response is the target (see the module docstring)."""
        xs = self.parse_prompt(prompt)
        ys = response.split()
        return self.walk_score(xs, ys) / 3 + 2 * self.plan_score(xs, ys) / 3

    def picks_goal_arm(self, prompt: str, response: str) -> bool:
        """Whether the response starts at the centre and leaves it by the arm that ends at the goal."""
        xs = self.parse_prompt(prompt)
        return response.split()[:2] == self.target(xs)[:2]

    # --- sampling ------------------------------------------------------------------------------------------------
    def sample_prompt_symbols(self, rng: random.Random) -> StarGraph:
        names = rng.sample(self.symbols, 1 + self.degree * self.arm_len)
        centre, rest = names[0], names[1:]
        arms = [rest[i * self.arm_len : (i + 1) * self.arm_len] for i in range(self.degree)]
        edges = [(centre, arm[0]) for arm in arms] + [(a, b) for arm in arms for a, b in zip(arm, arm[1:])]
        rng.shuffle(edges)
        return StarGraph(centre, tuple(edges), rng.choice(arms)[-1])

    def demonstrate(self, xs: StarGraph, noise: float, rng: random.Random) -> list[str]:
        """The plan-free demonstrator: a uniformly random arm (never reading the goal) walked from the centre to its
        leaf, then at each position and with probability ``noise`` one edit: substitute, delete or insert."""
        ys = [xs.centre] + rng.choice(xs.arms())
        out: list[str] = []
        for y in ys:
            if rng.random() < noise:
                edit = rng.randrange(3)
                if edit == 0:
                    out.append(rng.choice(self.symbols))
                elif edit == 2:
                    out.extend([rng.choice(self.symbols), y])
                # edit == 1: delete
            else:
                out.append(y)
        return out or [rng.choice(self.symbols)]

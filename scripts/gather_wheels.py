#!/usr/bin/env python3
"""Carry tunesmith to a GPU machine without internet (an air-gapped cluster) as a folder of wheels.

A bare GPU box usually has torch (built for its CUDA), transformers, peft and accelerate; it lacks datasets, trl,
tunesmith itself and some of tunesmith's other dependencies. This script gathers exactly those, on a machine that
can reach PyPI or a package mirror (pip's own settings apply: PIP_INDEX_URL, pip.conf), and installs them on the
box with pip alone, offline:

    # 1. on the GPU box (optional, recommended): what it has, so nothing it has is fetched or replaced
    python scripts/gather_wheels.py have > have.txt
    # 2. on a machine with internet or a mirror, same OS and Python version as the box, in a tunesmith checkout
    python scripts/gather_wheels.py download --have have.txt            # -> wheels/ (ignored by git)
    # 3. carry wheels/ (and the checkout) to the box, then, offline:
    python scripts/gather_wheels.py install                             # pip install --no-index --find-links wheels
    tunesmith selftest --output selftest-out

``download`` builds tunesmith's own wheel, lets pip resolve tunesmith + trl (pins from constraints.txt, and the
box's versions from ``--have``) without installing anything (``pip install --dry-run --report``), leaves out what the
box has (without ``--have``: torch, transformers, peft, accelerate and everything they depend on), downloads the rest
with ``pip download --no-deps`` and turns any source distribution into a wheel. Installs nothing on either machine
but in step 3. Standard library and pip only.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BOX_HAS = ("torch", "transformers", "peft", "accelerate")  # what a bare GPU box is assumed to have without --have
EXTRAS = ("trl",)  # installed next to tunesmith: the peer the selftest measures against


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def pip(*args: str, capture: bool = False) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, check=True, text=True, capture_output=capture)


def read_pins(path: Path) -> dict[str, str]:
    """``name==version`` lines (comments, blank lines and other lines ignored) -> {canonical name: version}."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)", line)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


def _requirement(spec: str):
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip vendors it
        from pip._vendor.packaging.requirements import Requirement
    return Requirement(spec)


def dependencies(item: dict, env: dict | None = None) -> list[str]:
    """Canonical names an entry of pip's installation report depends on (extras' dependencies left out)."""
    out = []
    for spec in item["metadata"].get("requires_dist") or []:
        req = _requirement(spec)
        if req.marker is None or req.marker.evaluate({**(env or {}), "extra": ""}):
            out.append(canonical(req.name))
    return out


def missing(report: dict, have: set[str] | None = None, roots=BOX_HAS,
            env: dict | None = None) -> list[tuple[str, str]]:
    """(name, version) of the packages in pip's installation ``report`` that the box lacks: those not in ``have``
    (canonical names), or, without ``have``, those outside the dependency closure of ``roots``."""
    items = {canonical(i["metadata"]["name"]): i for i in report["install"]}
    if have is None:
        have, todo = set(), [canonical(r) for r in roots]
        while todo:
            name = todo.pop()
            if name in have or name not in items:
                continue
            have.add(name)
            todo += dependencies(items[name], env)
    return sorted((i["metadata"]["name"], i["metadata"]["version"]) for n, i in items.items() if n not in have)


def installed() -> dict[str, str]:
    from importlib import metadata

    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def cmd_have(args) -> int:
    text = "".join(f"{name}=={version}\n" for name, version in sorted(installed().items()))
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


def cmd_download(args) -> int:
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    platform = []
    if args.python_version:
        platform += ["--python-version", args.python_version]
    if args.platform:
        platform += ["--platform", args.platform]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pip("wheel", "--no-deps", "--wheel-dir", str(dest), str(ROOT))
        ours = max(dest.glob("tunesmith-*.whl"), key=lambda p: p.stat().st_mtime)
        have = read_pins(Path(args.have)) if args.have else None
        pins = read_pins(ROOT / "constraints.txt") if (ROOT / "constraints.txt").exists() else {}
        pins.update(have or {})  # the box's own versions win
        pins.pop("tunesmith", None)
        constraints = tmp / "constraints.txt"
        constraints.write_text("".join(f"{n}=={v}\n" for n, v in sorted(pins.items())), encoding="utf-8")
        report = tmp / "report.json"
        resolve = ["install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report),
                   "-c", str(constraints), str(ours), *args.extra]
        if platform:  # pip resolves for another interpreter only into a --target, from wheels only
            resolve += ["--target", str(tmp / "target"), "--only-binary=:all:", *platform]
        pip(*resolve)
        env = {"python_version": args.python_version} if args.python_version else None
        need = [(n, v) for n, v in missing(json.loads(report.read_text()), set(have) if have else None, env=env)
                if canonical(n) != "tunesmith"]
        if need:
            pip("download", "--no-deps", "--dest", str(dest), *platform, *[f"{n}=={v}" for n, v in need])
        for sdist in [*dest.glob("*.tar.gz"), *dest.glob("*.zip")]:  # offline installs take wheels only
            pip("wheel", "--no-deps", "--wheel-dir", str(dest), str(sdist))
            sdist.unlink()
    names = sorted(p.name for p in dest.glob("*.whl"))
    (dest / "WHEELS.txt").write_text("".join(n + "\n" for n in names), encoding="utf-8")
    print(f"{len(names)} wheels in {dest} (tunesmith and: {', '.join(n for n, _ in need) or 'nothing else'}).\n"
          f"Carry {dest}/ to the GPU box and run there: python scripts/gather_wheels.py install --dest {dest}")
    return 0


def cmd_install(args) -> int:
    dest = Path(args.dest)
    if not any(dest.glob("tunesmith-*.whl")):
        print(f"gather_wheels: error: {dest} holds no tunesmith wheel (run 'download' on a machine with internet "
              "first)", file=sys.stderr)
        return 2
    pip("install", "--no-index", "--find-links", str(dest), "tunesmith", *args.extra)
    print("installed offline; now run: tunesmith selftest --output selftest-out")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    h = sub.add_parser("have", help="on the GPU box: print its installed packages as name==version")
    h.add_argument("--out", help="write to this file instead of stdout")
    d = sub.add_parser("download", help="with internet or a mirror: gather the wheels the box lacks into --dest")
    d.add_argument("--dest", default=str(ROOT / "wheels"))
    d.add_argument("--have", help="the box's 'have' list: fetch nothing it has, resolve against its versions")
    d.add_argument("--extra", nargs="*", default=list(EXTRAS), help="packages installed next to tunesmith")
    d.add_argument("--python-version", help="the box's Python (e.g. 3.11) when this machine's differs")
    d.add_argument("--platform", help="the box's platform tag (e.g. manylinux2014_x86_64) when this one's differs")
    i = sub.add_parser("install", help="on the GPU box, offline: pip install --no-index --find-links DEST")
    i.add_argument("--dest", default=str(ROOT / "wheels"))
    i.add_argument("--extra", nargs="*", default=list(EXTRAS))
    args = ap.parse_args(argv)
    return {"have": cmd_have, "download": cmd_download, "install": cmd_install}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())

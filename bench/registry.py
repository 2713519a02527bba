"""Loading the identity registry for matching: the sealed matrix against row by row (issue 17).

    python bench/registry.py [--count 100000] [--per-person 10] [--dims 128,512] [--rounds 5]
                             [--warm 3] [--baseline-src DIR] [--ids sequential|random]

For each dim, builds a registry of --count random unit embeddings (--per-person per identity)
in a temporary folder, through the product's own bulk path (an export file, then `identity
import`), and a copy of it as an older version leaves it (no matrix table: the same rows).
Then times what the matcher does when it starts or reloads (`open_for_matching`, the
identities, the model's embeddings), each round in a new Python process per variant, rounds
interleaved:
  - cold: the first load in that process (import time printed apart);
  - warm: the median of --warm more loads in the same process (a reload);
for "matrix" (this version, registry with the matrix) and "rows" (this version, the old-format
copy: the fallback, row by row). With --baseline-src (a folder holding another version's
consent_guard/, e.g. `git archive HEAD consent_guard | tar -x -C DIR` before a change) the
rounds also time that version on the same registry built by it ("baseline matrix": its
own file layout and sealed copies) and on an old-format copy of that ("baseline rows").
Prints median seconds, the ratios, whether every variant loaded the identical matrix (sha256
of vectors, owners, ids and scopes), what one enrolment costs now that every write updates
the copies (this version, and the baseline's when given; each in a new process, on a fresh
copy of the registry that version built), and where a warm load of this version spends its
time, each part alone (the digests of the rows, row by row and as the load's thread takes it
in blocks, the identity list, the matrix), against the load itself, whose thread runs the
rows' digest beside the rest. Identity ids are sequential by
default (as in earlier runs, so figures compare); `--ids random` makes them as enrolment does
(random hex), so that reading the rows in identity order (the digest of versions before
registry_matrix.ROWS_SQL, the row-by-row fallback) visits the file's pages out of order.

No network, no faces: random vectors. Timings on a shared machine are noisy: compare the
ratios of one run, and see the load average printed at the end.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
if __name__ == "__main__" and not any(a.startswith("--child") for a in sys.argv):
    sys.path.insert(0, str(REPO))

PASS = "bench passphrase"
MODEL = "bench-model"


def unit_vectors(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def build(home: Path, dim: int, count: int, per_person: int, random_ids: bool = False) -> dict:
    """A registry of `count` embeddings at home/identities.db (key file beside it), made by
    writing an export and importing it: one transaction, as a school's import is."""
    from consent_guard.registry import Consent, Registry, _b64, write_export

    home.mkdir(parents=True)
    t0 = time.perf_counter()
    vectors = unit_vectors(count, dim, seed=dim)
    consent = Consent("bench").to_dict()
    records = []
    rng = np.random.default_rng(dim)
    for i, start in enumerate(range(0, count, per_person)):
        rows = vectors[start:start + per_person]
        ident = f"id_{rng.bytes(6).hex()}" if random_ids else f"id_{i:012x}"
        records.append({"id": ident, "name": f"Person {i}", "aliases": [],
                        "scope": ("any", "explicit")[i % 2], "created": "2026-01-01T00:00:00Z",
                        "consent": consent,
                        "embeddings": {MODEL: {"dim": dim,
                                               "vectors": _b64(rows.astype("<f4").tobytes())}}})
    export = home.parent / f"bench-{dim}.cgx"
    write_export(export, PASS, records)
    t1 = time.perf_counter()
    with Registry.create(home / "identities.db", PASS, key_file=home / "registry.key") as reg:
        reg.import_file(export, PASS)
    t2 = time.perf_counter()
    export.unlink()
    return {"identities": len(records), "export_s": t1 - t0, "import_s": t2 - t1,
            "mb": (home / "identities.db").stat().st_size / 1e6}


def old_format_copy(home: Path, to: Path) -> None:
    """The same registry as a version before the matrix leaves it: no matrix, no triggers,
    no index for the rows' digest (its page size is the one `home` has)."""
    shutil.copytree(home, to)
    db = sqlite3.connect(to / "identities.db", isolation_level=None)
    try:
        for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger' "
                                  "AND name LIKE 'matrix_%'").fetchall():
            db.execute(f"DROP TRIGGER {name}")
        db.execute("DROP TABLE matrix")
        db.execute("DROP INDEX IF EXISTS embedding_rows")
        db.execute("VACUUM")
    finally:
        db.close()


def load(home: Path) -> tuple:
    """What the engine does at start: open for matching (checks every row), the identities
    (face backend, prompt names), the embeddings of the model it matches with. Returns
    (seconds, sha256 of what was loaded)."""
    from consent_guard.policy import Policy
    from consent_guard.registry import open_for_matching

    t0 = time.perf_counter()
    reg = open_for_matching(Policy(), home)
    try:
        identities = reg.identities()
        emb = reg.embeddings(reg.model_ids()[0])
    finally:
        reg.close()
    seconds = time.perf_counter() - t0
    h = hashlib.sha256(np.ascontiguousarray(emb.vectors, "<f4").tobytes())
    h.update(np.asarray(emb.owners, "<i8").tobytes())
    h.update(json.dumps([list(i) for i in emb.identities]).encode())
    h.update(str(len(identities)).encode())
    return seconds, h.hexdigest()


def stages(home: Path, rounds: int) -> dict:
    """Median seconds of each part of a load, timed apart on one open registry: the digest of
    the model's rows, the digest of the identity rows, the identity list (decrypt, parse,
    objects) and the matrix (read, decrypt, arrays; its rows' digest already checked)."""
    from consent_guard.policy import Policy
    from consent_guard.registry import open_for_matching

    from consent_guard.registry_matrix import rows_digest_by_blocks

    times: dict = {"rows digest": [], "rows digest in blocks": [], "identity digest": [],
                   "identity list": [], "matrix": []}
    reg = open_for_matching(Policy(), home)
    try:
        model = reg.model_ids()[0]
        for _ in range(rounds):
            for name, part in (("rows digest", lambda: reg._rows_digest(model)),
                               ("rows digest in blocks",
                                lambda: rows_digest_by_blocks(reg._db, model)),
                               ("identity digest", reg._identity_digest),
                               ("identity list", reg._matrix_identities),
                               ("matrix", lambda: reg._open_matrix(model))):
                t0 = time.perf_counter()
                part()
                times[name].append(time.perf_counter() - t0)
    finally:
        reg.close()
    out = {k: statistics.median(v) for k, v in times.items()}
    out["identity list"] -= out["identity digest"]  # it checks that digest too
    return out


def aside_now() -> str:
    """Whether this version checks the rows in a thread at the moment (a core is free), and
    why: on a saturated machine it does it all on one thread instead."""
    from consent_guard.registry import _spare_core

    load = f"load {os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "no load average"
    return f"{'yes' if _spare_core() else 'no'}, {load} on {os.cpu_count()} cores"


def child(home: Path, warm: int) -> None:
    """One cold load in this fresh process, then `warm` more: prints import seconds, the cold
    load's seconds, the median of the warm ones and the digests of what each loaded."""
    t0 = time.perf_counter()
    import consent_guard.registry  # noqa: F401  (numpy, cryptography, sqlite3)
    import consent_guard.policy  # noqa: F401
    imported = time.perf_counter() - t0
    seconds, digest = load(home)
    again = [load(home) for _ in range(warm)]
    print(json.dumps({"import_s": imported, "load_s": seconds,
                      "warm_s": statistics.median(s for s, _ in again) if again else None,
                      "digests": sorted({digest, *(d for _, d in again)})}))


def cold(home: Path, src: Path, warm: int) -> dict:
    env = dict(os.environ, PYTHONPATH=str(src), PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(home),
                          "--warm", str(warm)],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"cold load with {src} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_dim(dim: int, args, tmp: Path) -> None:
    home, old = tmp / f"d{dim}" / "home", tmp / f"d{dim}" / "old"
    info = build(home, dim, args.count, args.per_person, args.ids == "random")
    old_format_copy(home, old)
    print(f"\n{args.count} x {dim}-d embeddings, {info['identities']} identities, "
          f"{info['mb']:.0f} MB: built in {info['export_s'] + info['import_s']:.1f} s "
          f"(export file {info['export_s']:.1f} s, import with matrix {info['import_s']:.1f} s)")
    variants = {"matrix": (home, REPO), "rows": (old, REPO)}
    base = tmp / f"d{dim}" / "baseline"
    if args.baseline_src:  # the same registry, built by the baseline: its file, its copies
        child_run(Path(args.baseline_src), "--child-build",
                  f"{base / 'home'},{dim},{args.count},{args.per_person},{args.ids}")
        old_format_copy(base / "home", base / "old")
        variants["baseline matrix"] = (base / "home", Path(args.baseline_src))
        variants["baseline rows"] = (base / "old", Path(args.baseline_src))
    cold_s = {k: [] for k in variants}
    warm_s = {k: [] for k in variants}
    cold_import = []
    digests = {k: set() for k in variants}
    for _ in range(args.rounds):
        for name, (where, src) in variants.items():
            r = cold(where, src, args.warm)
            cold_s[name].append(r["load_s"])
            if r["warm_s"] is not None:
                warm_s[name].append(r["warm_s"])
            cold_import.append(r["import_s"])
            digests[name].update(r["digests"])
    report("cold (first load in a new process)", cold_s)
    print(f"  import of the registry module in a new process: median "
          f"{statistics.median(cold_import):.3f} s (not included above)")
    if args.warm:
        report(f"warm (median of {args.warm} more loads in that process)", warm_s)
    print("  where a warm load of this version goes, each part alone, median: " + ", ".join(
        f"{k} {v:.3f} s" for k, v in stages(home, args.rounds).items())
        + f"; the whole load: {statistics.median(load(home)[0] for _ in range(args.rounds)):.3f}"
          f" s (rows' digest in a thread beside the rest: {aside_now()})")
    same = len(set.union(*digests.values())) == 1 and all(len(d) == 1 for d in digests.values())
    print(f"  identical matrices loaded by every variant and round: {'yes' if same else 'NO'}")
    if not same:
        raise SystemExit(1)
    enrol = {"this version": [], "baseline": []} if args.baseline_src else {"this version": []}
    for i in range(args.enrol_rounds):  # a copy per round, so each enrolment sees the same file
        for name in enrol:
            src, built = (REPO, home) if name == "this version" else \
                (Path(args.baseline_src), base / "home")
            copy = tmp / f"d{dim}" / f"enrol-{name.split()[0]}-{i}"
            shutil.copytree(built, copy)
            enrol[name].append(cold_enrol(copy, src, dim, args.per_person))
            shutil.rmtree(copy)
    print(f"  one enrolment ({args.per_person} embeddings) on this registry, copies updated "
          f"in the same transaction, median of {args.enrol_rounds} (new process each): "
          + ", ".join(f"{k} {statistics.median(v):.2f} s" for k, v in enrol.items())
          + (f"; baseline / this = {ratio(enrol['baseline'], enrol['this version']):.1f}x"
             if args.baseline_src else ""))


def cold_enrol(home: Path, src: Path, dim: int, n: int) -> float:
    """enrol_seconds in a new process running the consent_guard/ of `src`."""
    return float(child_run(src, "--child-enrol", f"{home},{dim},{n}"))


def child_run(src: Path, *argv: str) -> str:
    """The last line this script prints when run with `argv` on the consent_guard/ of src."""
    env = dict(os.environ, PYTHONPATH=str(src), PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv], env=env,
                         capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"{' '.join(argv)} with {src} failed:\n{out.stderr}")
    return (out.stdout.strip().splitlines() or [""])[-1]


def enrol_seconds(home: Path, dim: int, n: int) -> float:
    """What a write costs: one `add` (the passphrase derivation is not counted)."""
    from consent_guard.registry import Consent, Registry

    with Registry.open(home / "identities.db", passphrase=PASS) as reg:
        t0 = time.perf_counter()
        reg.add("One More", "any", Consent("bench"), {MODEL: unit_vectors(n, dim, seed=1)})
        return time.perf_counter() - t0


def ratio(a: list, b: list) -> float:
    return statistics.median(a) / statistics.median(b)


def report(label: str, times: dict) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    parts = [f"{k} {m:.3f} s (min {min(times[k]):.3f})" for k, m in med.items()]
    ratios = [f"{k} / matrix = {m / med['matrix']:.1f}x" for k, m in med.items() if k != "matrix"]
    print(f"  {label}: " + ", ".join(parts) + "; " + ", ".join(ratios))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=100_000)
    ap.add_argument("--per-person", type=int, default=10)
    ap.add_argument("--dims", default="128,512")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warm", type=int, default=3, help="loads after the cold one, per process")
    ap.add_argument("--baseline-src", help="a folder with another version's consent_guard/")
    ap.add_argument("--enrol-rounds", type=int, default=3)
    ap.add_argument("--ids", choices=("sequential", "random"), default="sequential")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-enrol", help=argparse.SUPPRESS)
    ap.add_argument("--child-build", help=argparse.SUPPRESS)
    args = ap.parse_args()
    # the row-by-row fallback logs a warning on every load of the old-format copy
    logging.getLogger("consent_guard").setLevel(logging.ERROR)
    if args.child:
        return child(Path(args.child), args.warm)
    if args.child_enrol:
        home, dim, n = args.child_enrol.split(",")
        return print(enrol_seconds(Path(home), int(dim), int(n)))
    if args.child_build:  # the registry as the consent_guard/ on PYTHONPATH builds it
        home, dim, count, per_person, ids = args.child_build.split(",")
        build(Path(home), int(dim), int(count), int(per_person), ids == "random")
        return None
    with tempfile.TemporaryDirectory(prefix="cg-bench-registry-") as tmp:
        for dim in (int(d) for d in args.dims.split(",")):
            bench_dim(dim, args, Path(tmp))
    print(f"\nload average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
          f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()

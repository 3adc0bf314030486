"""Carry several vLLM releases to a GPU machine without network, in few small transfers.

Input: the folders that ``stage-vllm.sh VERSION DIR`` writes (each holds the split vLLM
wheel ``part.*``, a split tar of the dependency wheels ``dpart.*`` and ``install.sh``
with the wheel's name and sha256). ``pack`` joins them into one byte stream, the
dependency wheels of all releases once (most are shared), then each vLLM wheel, and
cuts that stream into pieces of at most ``--piece-mib``, one folder per transfer:

    python bench/device_stage.py pack OUT_DIR STAGED_DIR_0.26.0 STAGED_DIR_0.20.2

    OUT_DIR/c01/{manifest.json, piece.000}, OUT_DIR/c02/piece.001, ...

On the GPU machine, copy every folder's files into one directory (as they arrive), then:

    python3 bench/device_stage.py install STAGE_DIR RELEASE TARGET_DIR [--deps-only]

extracts what that release needs (waiting for no piece: it fails if one is missing),
checks the sha256 of every member, and installs the release and its own dependency
wheels with ``pip install --target TARGET_DIR`` (select it with ``PYTHONPATH``), so that
releases live side by side. ``--deps-only`` installs the dependencies only (they arrive
first). ``ready STAGE_DIR RELEASE`` exits 0 once every piece that release needs is there.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

MANIFEST = "manifest.json"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _staged_release(staged: Path) -> tuple[str, bytes, dict[str, bytes]]:
    """(release, vLLM wheel bytes, {dep wheel name: bytes}) of a stage-vllm.sh folder."""
    files = sorted(p for p in staged.glob("c*/*") if p.is_file())
    install = next(p for p in files if p.name == "install.sh").read_text()
    wheel_name = re.search(r"cat part\.\* > (\S+\.whl)", install)[1]
    want_sum = re.search(r'"([0-9a-f]{64})  ' + re.escape(wheel_name), install)[1]
    release = re.search(r"\.installed-(\S+) \]", install)[1]
    wheel = b"".join(
        p.read_bytes() for p in sorted(files, key=lambda p: p.name) if p.name.startswith("part.")
    )
    if _sha256(wheel) != want_sum:
        raise SystemExit(f"{staged}: wheel checksum mismatch")
    deps_tar = b"".join(
        p.read_bytes() for p in sorted(files, key=lambda p: p.name) if p.name.startswith("dpart.")
    )
    deps = {}
    with tarfile.open(fileobj=io.BytesIO(deps_tar)) as tar:
        for member in tar.getmembers():
            if member.isfile() and member.name.endswith(".whl"):
                deps[Path(member.name).name] = tar.extractfile(member).read()
    return release, wheel, {"wheel_name": wheel_name, "deps": deps}


def cmd_pack(args: argparse.Namespace) -> int:
    releases = {}
    all_deps: dict[str, bytes] = {}
    for staged in args.staged:
        release, wheel, info = _staged_release(Path(staged))
        all_deps.update(info["deps"])
        releases[release] = {
            "wheel": wheel,
            "wheel_name": info["wheel_name"],
            "deps": sorted(info["deps"]),
        }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in sorted(all_deps):
            ti = tarfile.TarInfo(f"deps/{name}")
            ti.size = len(all_deps[name])
            tar.addfile(ti, io.BytesIO(all_deps[name]))
    members = [("deps.tar", buf.getvalue())]
    members += [(info["wheel_name"], info["wheel"]) for info in releases.values()]
    stream = b"".join(data for _, data in members)
    manifest = {"piece_bytes": args.piece_mib << 20, "members": [], "releases": {}}
    offset = 0
    for name, data in members:
        manifest["members"].append(
            {"name": name, "offset": offset, "size": len(data), "sha256": _sha256(data)}
        )
        offset += len(data)
    for release, info in releases.items():
        manifest["releases"][release] = {"wheel": info["wheel_name"], "deps": info["deps"]}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    step = manifest["piece_bytes"]
    n = (len(stream) + step - 1) // step
    for k in range(n):
        folder = out / f"c{k + 1:02d}"
        folder.mkdir(exist_ok=True)
        (folder / f"piece.{k:03d}").write_bytes(stream[k * step : (k + 1) * step])
    manifest["pieces"] = n
    (out / "c01" / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    for release in releases:
        print(f"{release}: complete after folder c{_last_piece(manifest, release) + 1:02d}")
    print(f"{n} folders, {len(stream) / 2**20:.0f} MiB, deps shared: {len(all_deps)} wheels")
    return 0


def _needed(manifest: dict, release: str, deps_only: bool = False) -> list[dict]:
    info = manifest["releases"][release]
    names = {"deps.tar"} if deps_only else {"deps.tar", info["wheel"]}
    return [m for m in manifest["members"] if m["name"] in names]


def _last_piece(manifest: dict, release: str, deps_only: bool = False) -> int:
    step = manifest["piece_bytes"]
    return max((m["offset"] + m["size"] - 1) // step for m in _needed(manifest, release, deps_only))


def _read_member(stage: Path, manifest: dict, member: dict) -> bytes:
    step = manifest["piece_bytes"]
    start, end = member["offset"], member["offset"] + member["size"]
    chunks = []
    for k in range(start // step, (end - 1) // step + 1):
        data = (stage / f"piece.{k:03d}").read_bytes()
        lo, hi = max(start - k * step, 0), min(end - k * step, step)
        chunks.append(data[lo:hi])
    data = b"".join(chunks)
    if _sha256(data) != member["sha256"]:
        raise SystemExit(f"{member['name']}: checksum mismatch (piece incomplete?)")
    return data


def cmd_ready(args: argparse.Namespace) -> int:
    stage = Path(args.stage)
    if not (stage / MANIFEST).exists():
        return 1
    manifest = json.loads((stage / MANIFEST).read_text())
    last = _last_piece(manifest, args.release, args.deps_only)
    step = manifest["piece_bytes"]
    for k in range(last + 1):
        piece = stage / f"piece.{k:03d}"
        total = sum(m["size"] for m in manifest["members"])
        size = min(step, total - k * step)
        if not piece.exists() or piece.stat().st_size != size:
            return 1
    return 0


def cmd_install(args: argparse.Namespace) -> int:
    stage = Path(args.stage)
    manifest = json.loads((stage / MANIFEST).read_text())
    info = manifest["releases"][args.release]
    work = stage / f"unpacked-{args.release}"
    work.mkdir(exist_ok=True)
    paths = []
    for member in _needed(manifest, args.release, args.deps_only):
        data = _read_member(stage, manifest, member)
        if member["name"] == "deps.tar":
            with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                for name in info["deps"]:
                    target = work / name
                    target.write_bytes(tar.extractfile(f"deps/{name}").read())
                    paths.append(str(target))
        else:
            target = work / member["name"]
            target.write_bytes(data)
            paths.append(str(target))
    marker = Path(args.target) / ".deps-installed"
    if not args.deps_only and marker.exists():  # deps already there: the wheel alone
        paths = [str(work / info["wheel"])]
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps"]
    cmd += ["--no-compile", "--target", args.target, *paths]
    subprocess.run(cmd, check=True)
    if args.deps_only:
        marker.write_text("\n".join(info["deps"]) + "\n")
    print(f"installed {'deps of ' if args.deps_only else ''}{args.release} into {args.target}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack")
    p.add_argument("out_dir")
    p.add_argument("staged", nargs="+", help="stage-vllm.sh output folders")
    p.add_argument("--piece-mib", type=int, default=62)
    p.set_defaults(func=cmd_pack)
    for name, func in (("ready", cmd_ready), ("install", cmd_install)):
        s = sub.add_parser(name)
        s.add_argument("stage")
        s.add_argument("release")
        if name == "install":
            s.add_argument("target")
        s.add_argument("--deps-only", action="store_true")
        s.set_defaults(func=func)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

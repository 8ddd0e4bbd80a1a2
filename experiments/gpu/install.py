"""run.sh's install step: the bundle's wheels the image lacks, then gpt2_jax, into this Python,
offline and with --no-deps; then which of gpt2_jax's declared requirements this Python does not
meet (reported, not fatal: the image's own versions are what the GPU run tests).

    python experiments/gpu/install.py BUNDLE_DIR OUT_JSON [--dry-run]

--dry-run installs nothing: it reports what it would install and the unmet requirements.
Standard library only (packaging, where present, for the version checks).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PIP = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q",
       "--no-index", "--no-deps", "--no-compile"]  # fmt: skip


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> tuple[str, str]:
    """(distribution, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return _canonical(name), version


def installed(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def unmet_requirements() -> list[str]:
    """gpt2_jax's own requirements (no extras) that this Python does not satisfy."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        return ["(packaging is not installed: requirements not checked)"]
    try:
        reqs = metadata.requires("gpt2_jax") or []
    except metadata.PackageNotFoundError:  # not installed: read pyproject.toml's list
        text = (ROOT / "pyproject.toml").read_text()
        block = text.split("dependencies = [", 1)[1].split("]", 1)[0]
        reqs = re.findall(r'^\s*"([^"]+)"', block, flags=re.M)
    out = []
    for line in reqs:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an extra's requirement
        have = installed(req.name)
        if have is None:
            out.append(f"{req}: not installed")
        elif not req.specifier.contains(have, prereleases=True):
            out.append(f"{req}: {have} installed")
    return out


def main(bundle: str, out_json: str, *flags: str) -> int:
    dry = "--dry-run" in flags
    bundle_dir = Path(bundle)
    wheels = sorted(bundle_dir.glob("*.whl")) if bundle_dir.is_dir() else []
    report = {"dry_run": dry, "bundle": str(bundle_dir), "python": sys.executable}
    if not wheels:
        report["bundle_error"] = (
            f"no wheels in {bundle_dir}: run `make gpu-bundle` here, and carry "
            '["experiments/gpu/wheels"] with the device run'
        )
        print(f"install: {report['bundle_error']}")
    present, missing = {}, []
    for w in wheels:
        dist, version = wheel_name(w)
        have = installed(dist)
        if have is None:
            missing.append(w)
        else:
            present[dist] = have
        verb = "would install" if dry else "installing"
        print(f"install: {w.name}: " + (f"{sys.executable} has {dist} {have}" if have else verb))
    report["already_present"] = present
    report["missing"] = [w.name for w in missing]  # installed, unless a dry run
    rc = 0
    if not dry:
        if missing:
            p = subprocess.run([*PIP, *map(str, missing)], capture_output=True, text=True)
            report["wheels_rc"] = p.returncode
            if p.returncode:
                report["wheels_error"] = p.stderr[-3000:]
                rc = 1
        # gpt2_jax itself, from this tree (setuptools is on the image; no build isolation,
        # which would need the network). The tests run the tree through PYTHONPATH anyway.
        p = subprocess.run(
            [*PIP, "--no-build-isolation", str(ROOT)], capture_output=True, text=True
        )
        report["project_rc"] = p.returncode
        if p.returncode:
            report["project_error"] = p.stderr[-3000:]
            print(f"install: gpt2_jax did not install (the run uses the tree): {p.stderr[-500:]}")
    report["gpt2_jax"] = installed("gpt2_jax")
    report["unmet_requirements"] = unmet_requirements()
    for line in report["unmet_requirements"]:
        print(f"install: unmet requirement (reported only): {line}")
    Path(out_json).write_text(json.dumps(report, indent=1) + "\n")
    return rc


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

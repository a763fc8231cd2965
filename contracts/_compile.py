"""Recompile the Solidity sources into the committed artifacts (a development tool).

Runs the pinned solc-js from the repository's ``node_modules`` (``npm ci`` installs it)
through solc's standard-JSON interface, resolves ``@openzeppelin/...`` imports from
``node_modules``, and writes one JSON artifact per contract plus ``manifest.json``:
compiler version and settings, a sha256 of every source read (ours and OpenZeppelin's)
and of every artifact. Running the product never needs this; the artifacts are package data.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from blendsm.contracts._artifacts import (
    ARTIFACTS_DIR,
    COMPILER_SETTINGS,
    CONTRACT_NAMES,
    MANIFEST_NAME,
    SOURCES_DIR,
    source_hashes,
)
from blendsm.errors import ArtifactError

__all__ = ["compile_contracts", "repository_root", "solc_version"]

# A small standard-JSON driver: stdin -> solc.compile with an import callback -> stdout.
_DRIVER = r"""
const fs = require('fs');
const path = require('path');
const solc = require('solc');
const input = fs.readFileSync(0, 'utf8');
function findImports(p) {
  try { return { contents: fs.readFileSync(path.join('node_modules', p), 'utf8') }; }
  catch (e) { return { error: 'not found: ' + p }; }
}
const out = JSON.parse(solc.compile(input, { import: findImports }));
out.compilerVersion = solc.version();
process.stdout.write(JSON.stringify(out));
"""


def repository_root() -> Path:
    """The checkout holding ``contracts/src`` and ``node_modules`` (dev installs only)."""
    return SOURCES_DIR.parent.parent


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        raise ArtifactError("node is not on PATH; install Node.js 18+ and run `npm ci`")
    if not (repository_root() / "node_modules" / "solc").is_dir():
        raise ArtifactError(
            f"solc-js not found under {repository_root() / 'node_modules'}; run `npm ci`"
        )
    return node


def solc_version() -> str:
    """The version string of the pinned solc-js, e.g. ``0.8.28+commit.7893614a.Emscripten.clang``."""
    out = subprocess.run(
        [_node(), "-e", "process.stdout.write(require('solc').version())"],
        cwd=repository_root(),
        check=True,
        capture_output=True,
        text=True,
    )
    return out.stdout.strip()


def _run_solc(sources: dict[str, str]) -> dict[str, Any]:
    std_input = {
        "language": "Solidity",
        "sources": {name: {"content": text} for name, text in sources.items()},
        "settings": {
            **COMPILER_SETTINGS,
            "outputSelection": {
                "*": {"*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"]}
            },
        },
    }
    proc = subprocess.run(
        [_node(), "-e", _DRIVER],
        cwd=repository_root(),
        input=json.dumps(std_input),
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise ArtifactError(f"solc-js failed: {proc.stderr.strip()[-2000:]}")
    out: dict[str, Any] = json.loads(proc.stdout)
    errors = [e for e in out.get("errors", []) if e.get("severity") == "error"]
    if errors:
        raise ArtifactError(
            "compilation failed:\n" + "\n".join(e["formattedMessage"] for e in errors)
        )
    return out


def compile_contracts(out_dir: Path = ARTIFACTS_DIR) -> dict[str, Any]:
    """Compile every source under ``contracts/src`` and write artifacts and manifest.

    Returns the manifest. Warnings are kept in the manifest so they stay visible in review.
    """
    ours = sorted(SOURCES_DIR.rglob("*.sol"))
    sources = {f"blendsm/{p.relative_to(SOURCES_DIR).as_posix()}": p.read_text() for p in ours}
    out = _run_solc(sources)
    # Every source unit solc read, ours and the imported OpenZeppelin files.
    used = sorted(out["sources"])
    node_modules = repository_root() / "node_modules"
    texts = {u: sources[u] if u in sources else (node_modules / u).read_text() for u in used}
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts: dict[str, str] = {}
    for unit, contracts in sorted(out["contracts"].items()):
        for name, data in sorted(contracts.items()):
            if name not in CONTRACT_NAMES:
                continue
            artifact = {
                "contractName": name,
                "sourceName": unit,
                "abi": data["abi"],
                "bytecode": "0x" + data["evm"]["bytecode"]["object"],
                "deployedBytecode": "0x" + data["evm"]["deployedBytecode"]["object"],
            }
            text = json.dumps(artifact, indent=1, sort_keys=True) + "\n"
            (out_dir / f"{name}.json").write_text(text)
            artifacts[name] = hashlib.sha256(text.encode()).hexdigest()
    missing = set(CONTRACT_NAMES) - set(artifacts)
    if missing:
        raise ArtifactError(f"solc produced no artifact for {sorted(missing)}")
    manifest = {
        "compilerVersion": out["compilerVersion"],
        "settings": COMPILER_SETTINGS,
        "sources": source_hashes(texts),
        "artifacts": artifacts,
        "warnings": sorted(
            {e["formattedMessage"] for e in out.get("errors", []) if e.get("severity") != "error"}
        ),
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest

"""Committed contract artifacts: where they live, how they load, how staleness is caught.

Artifacts are package data, so running BlendSM needs no compiler. ``manifest.json`` records
the compiler version and settings and a sha256 of each source and each artifact (as
raiden-contracts does); :func:`verify_manifest` recomputes them and names what changed.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from pathlib import Path
from typing import Any, Final

from blendsm.errors import ArtifactError

__all__ = [
    "ARTIFACTS_DIR",
    "COMPILER_SETTINGS",
    "CONTRACT_NAMES",
    "EVM_VERSION",
    "LATER_CONTRACTS",
    "MANIFEST_NAME",
    "SOURCES_DIR",
    "SUITE_CONTRACTS",
    "load_artifact",
    "load_manifest",
    "source_hashes",
    "verify_manifest",
]

_PACKAGE_DIR: Final = Path(__file__).resolve().parent
ARTIFACTS_DIR: Final = _PACKAGE_DIR / "artifacts"
SOURCES_DIR: Final = _PACKAGE_DIR / "src"
MANIFEST_NAME: Final = "manifest.json"

#: The oldest EVM fork with what the contracts need, so that permissioned PoA networks that
#: lag mainnet can run them: OpenZeppelin 5.7 uses MCOPY (Cancun) in its string utilities,
#: which EIP712 pulls in. py-evm, anvil, Besu (24.1+) and geth (1.13.12+) run Cancun.
EVM_VERSION: Final = "cancun"

COMPILER_SETTINGS: Final[dict[str, Any]] = {
    "evmVersion": EVM_VERSION,
    "optimizer": {"enabled": True, "runs": 1000},
    "metadata": {"bytecodeHash": "none"},
}

#: The marketplace suite, in deployment order.
SUITE_CONTRACTS: Final = (
    "Registry",
    "PaymentChannels",
    "Ratings",
    "Market",
    "DataAnchors",
    "Brokers",
)
#: Suite contracts added after the first deployments: a deployment file may lack them (it
#: predates them), and what needs one says so when asked (e.g. ``Marketplace.brokers``).
LATER_CONTRACTS: Final = ("Brokers",)
#: Every contract with an artifact; the last two are TEST ONLY.
CONTRACT_NAMES: Final = (*SUITE_CONTRACTS, "BlendsmTestToken", "ReentrantToken")


def source_hashes(texts: dict[str, str]) -> dict[str, str]:
    """sha256 of each source text, by source unit name."""
    return {unit: hashlib.sha256(text.encode()).hexdigest() for unit, text in sorted(texts.items())}


@cache
def load_manifest() -> dict[str, Any]:
    """The committed manifest (compiler, settings, source and artifact hashes)."""
    path = ARTIFACTS_DIR / MANIFEST_NAME
    try:
        manifest: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}") from exc
    return manifest


@cache
def load_artifact(name: str) -> dict[str, Any]:
    """The artifact of contract ``name``: ``abi``, ``bytecode``, ``deployedBytecode``.

    The file's sha256 must match the manifest, so a hand-edited artifact cannot load.
    """
    if name not in CONTRACT_NAMES:
        raise ArtifactError(f"unknown contract {name!r}; known: {', '.join(CONTRACT_NAMES)}")
    path = ARTIFACTS_DIR / f"{name}.json"
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"cannot read artifact {path}: {exc}") from exc
    expected = load_manifest()["artifacts"].get(name)
    if hashlib.sha256(raw).hexdigest() != expected:
        raise ArtifactError(f"artifact {path.name} does not match manifest.json; recompile")
    artifact: dict[str, Any] = json.loads(raw)
    return artifact


def verify_manifest(
    node_modules: Path | None = None,
    *,
    sources_dir: Path = SOURCES_DIR,
    manifest: dict[str, Any] | None = None,
) -> list[str]:
    """Problems that make the committed artifacts stale; empty when all is in order.

    Compares our sources (and, when ``node_modules`` is given, the OpenZeppelin sources)
    and the compiler settings with what the manifest recorded.
    """
    if manifest is None:
        manifest = load_manifest()
    problems: list[str] = []
    if manifest.get("settings") != COMPILER_SETTINGS:
        problems.append("compiler settings changed since the artifacts were built")
    recorded: dict[str, str] = manifest.get("sources", {})
    ours = {
        f"blendsm/{p.relative_to(sources_dir).as_posix()}": p.read_text()
        for p in sorted(sources_dir.rglob("*.sol"))
    }
    for unit, digest in source_hashes(ours).items():
        if recorded.get(unit) != digest:
            problems.append(f"{unit} changed (or is new) since the artifacts were built")
    for unit in recorded:
        if unit.startswith("blendsm/") and unit not in ours:
            problems.append(f"{unit} was removed since the artifacts were built")
    if node_modules is not None:
        for unit, digest in recorded.items():
            if unit.startswith("blendsm/"):
                continue
            path = node_modules / unit
            if not path.is_file():
                problems.append(f"{unit} is missing from {node_modules}")
            elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
                problems.append(f"{unit} differs from the one the artifacts were built with")
    return problems

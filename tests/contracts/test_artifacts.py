"""The committed artifacts must be exactly what the pinned compiler makes of the sources."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from blendsm.contracts import (
    ARTIFACTS_DIR,
    COMPILER_SETTINGS,
    CONTRACT_NAMES,
    MANIFEST_NAME,
    SOURCES_DIR,
    compile_contracts,
    load_artifact,
    load_manifest,
    repository_root,
    solc_version,
    verify_manifest,
)
from blendsm.errors import ArtifactError

NODE_MODULES = repository_root() / "node_modules"


def test_sources_and_settings_match_manifest() -> None:
    # Fails when a .sol file (ours or OpenZeppelin's) or the settings changed without a recompile.
    assert verify_manifest(NODE_MODULES) == []


def test_manifest_records_pinned_compiler_and_evm_version() -> None:
    manifest = load_manifest()
    assert manifest["settings"] == COMPILER_SETTINGS
    assert manifest["compilerVersion"] == solc_version()
    package = json.loads((repository_root() / "package.json").read_text())
    assert manifest["compilerVersion"].startswith(package["devDependencies"]["solc"] + "+")


def test_recompiling_reproduces_committed_artifacts(tmp_path: Path) -> None:
    fresh = compile_contracts(out_dir=tmp_path)
    committed = load_manifest()
    assert fresh["sources"] == committed["sources"]
    for name in CONTRACT_NAMES:
        assert (tmp_path / f"{name}.json").read_bytes() == (
            ARTIFACTS_DIR / f"{name}.json"
        ).read_bytes(), name
    assert (tmp_path / MANIFEST_NAME).read_bytes() == (ARTIFACTS_DIR / MANIFEST_NAME).read_bytes()


def test_edited_source_is_reported_stale(tmp_path: Path) -> None:
    sources = tmp_path / "src"
    shutil.copytree(SOURCES_DIR, sources)
    target = sources / "PaymentChannels.sol"
    target.write_text(target.read_text().replace("MAX_FEE_BPS = 1_000", "MAX_FEE_BPS = 9_000"))
    (sources / "Extra.sol").write_text(
        "// SPDX-License-Identifier: Apache-2.0\npragma solidity 0.8.28;\n"
    )
    problems = verify_manifest(sources_dir=sources)
    assert any("PaymentChannels.sol changed" in p for p in problems)
    assert any("Extra.sol changed (or is new)" in p for p in problems)


def test_removed_source_and_changed_settings_are_reported(tmp_path: Path) -> None:
    sources = tmp_path / "src"
    shutil.copytree(SOURCES_DIR, sources)
    (sources / "Ratings.sol").unlink()
    manifest = dict(load_manifest())
    manifest["settings"] = {**COMPILER_SETTINGS, "evmVersion": "prague"}
    problems = verify_manifest(sources_dir=sources, manifest=manifest)
    assert any("Ratings.sol was removed" in p for p in problems)
    assert any("compiler settings changed" in p for p in problems)


def test_every_artifact_loads_with_abi_and_bytecode() -> None:
    for name in CONTRACT_NAMES:
        artifact = load_artifact(name)
        assert artifact["abi"], name
        assert len(bytes.fromhex(artifact["bytecode"][2:])) > 100, name


def test_unknown_artifact_is_refused() -> None:
    with pytest.raises(ArtifactError, match="unknown contract"):
        load_artifact("Nope")

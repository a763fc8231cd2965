"""Deploying the suite and the deployment file: round trip, atomic writes, clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from blendsm.contracts import (
    SUITE_CONTRACTS,
    Deployment,
    Marketplace,
    deploy_suite,
    disconnect,
    load_manifest,
    test_account,
)
from blendsm.errors import ConfigError

ANVIL = pytest.mark.parametrize("chain", ["anvil"], indirect=True)

SAMPLE = Deployment(
    chain_id=31337,
    addresses={name: "0x" + f"{i + 1:040x}" for i, name in enumerate(SUITE_CONTRACTS)},
    block=42,
    deployer="0x" + "ab" * 20,
    challenge_period=3600,
    compiler_version="0.8.28+commit.7893614a",
    extra={"note": "test"},
)


def test_save_load_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "deployment.json"
    SAMPLE.save(path)
    loaded = Deployment.load(path)
    # addresses come back in checksum form, so compare through a second round trip
    assert loaded == Deployment.from_json(loaded.to_json())
    assert loaded.chain_id == 31337
    assert loaded.block == 42
    assert loaded.extra == {"note": "test"}
    assert loaded.address("Market").lower() == SAMPLE.addresses["Market"].lower()
    assert loaded.deployer == "0xABaBaBaBABabABabAbAbABAbABabababaBaBABaB"
    assert json.loads(path.read_text())["challenge_period"] == 3600
    with pytest.raises(ConfigError, match="no address for 'Token'"):
        loaded.address("Token")


def test_save_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "deployment.json"
    SAMPLE.save(path)
    before = path.read_bytes()

    def crash(fd: int) -> None:
        raise OSError("disk on fire")

    changed = Deployment(
        **{**{f: getattr(SAMPLE, f) for f in Deployment.__dataclass_fields__}, "block": 99}
    )
    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk on fire"):
        changed.save(path)
    assert path.read_bytes() == before  # the old file is untouched
    assert [p.name for p in tmp_path.iterdir()] == ["deployment.json"]  # no temp file left
    monkeypatch.undo()
    changed.save(path)
    assert Deployment.load(path).block == 99


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("not json", "invalid deployment file"),
        ("[]", "invalid deployment file"),
        ('{"addresses": {}}', "chain_id"),
        ("MISSING_CHAIN", "chain_id"),
        ("BAD_ADDRESS", "invalid deployment file"),
        ("BAD_BLOCK", "invalid deployment file"),
        ("NO_MARKET", "lacks addresses for Market"),
    ],
)
def test_invalid_files_name_the_problem(tmp_path: Path, content: str, problem: str) -> None:
    good = json.loads(SAMPLE.to_json())
    variants = {
        "MISSING_CHAIN": {k: v for k, v in good.items() if k != "chain_id"},
        "BAD_ADDRESS": {**good, "addresses": {**good["addresses"], "Registry": "0x1234"}},
        "BAD_BLOCK": {**good, "block": "latest"},
        "NO_MARKET": {
            **good,
            "addresses": {k: v for k, v in good["addresses"].items() if k != "Market"},
        },
    }
    path = tmp_path / "deployment.json"
    path.write_text(json.dumps(variants[content]) if content in variants else content)
    with pytest.raises(ConfigError, match=problem):
        Deployment.load(path)


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(ConfigError, match=r"cannot read deployment file .*absent\.json"):
        Deployment.load(path)


@ANVIL
async def test_deploy_suite_on_anvil(chain: Any, tmp_path: Path) -> None:
    w3 = chain.async_w3()
    try:
        deployer = test_account("validator")  # funded by the fixture, not the session's oracle
        dep = await deploy_suite(w3, deployer, challenge_period=600)
        assert dep.chain_id == 31337
        assert dep.deployer == deployer.address
        assert set(dep.addresses) == set(SUITE_CONTRACTS)
        assert dep.block == await w3.eth.block_number
        assert dep.compiler_version == load_manifest()["compilerVersion"]
        assert dep.addresses != chain.deployment.addresses

        mp = Marketplace(w3, dep)
        await mp.check()  # right chain, code at every address
        assert await mp.channels.challenge_period() == 600
        assert await mp.registry.is_oracle(deployer.address)
        assert not await mp.registry.is_oracle(chain.addr("oracle"))
        market = mp.market.contract
        assert await market.functions.registry().call() == dep.address("Registry")
        assert await market.functions.ratings().call() == dep.address("Ratings")
        assert await mp.ratings.contract.functions.channels().call() == dep.address(
            "PaymentChannels"
        )
        assert await mp.anchors.contract.functions.registry().call() == dep.address("Registry")

        dep.save(tmp_path / "deployment.json")
        assert Deployment.load(tmp_path / "deployment.json") == dep
        with pytest.raises(ConfigError, match="challenge_period"):
            await deploy_suite(w3, deployer, challenge_period=0)
    finally:
        await disconnect(w3)

"""`blendsm deploy`: to the embedded chain and to a JSON-RPC node, with keys from the
environment or a keystore, and the errors a first-time user runs into."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account
from support import eventually

from blendsm.cli import main
from blendsm.contracts import SUITE_CONTRACTS, Deployment

ANVIL = pytest.mark.parametrize("chain", ["anvil"], indirect=True)

Process = Callable[..., subprocess.CompletedProcess[str]]  # the conftest's blendsm_process


def test_deploy_to_the_embedded_chain_prints_every_address(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["deploy", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(SUITE_CONTRACTS) <= set(out["addresses"])
    assert out["chain_id"] > 0


@ANVIL
def test_deploy_to_a_node_with_a_key_from_the_environment_writes_a_working_file(
    chain: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    deployer = chain.accounts["stranger"]  # TEST ONLY
    monkeypatch.setenv("DEPLOYER_KEY", "0x" + deployer.key.hex())
    out = tmp_path / "deployment.json"
    code = main(
        ["deploy", "--chain", chain.anvil.url, "--key-env", "DEPLOYER_KEY", "--out", str(out)]
    )
    assert code == 0
    human = capsys.readouterr().out
    assert f"Deployed the BlendSM suite to {chain.anvil.url}" in human
    assert f"Deployment written to {out}" in human
    deployment = Deployment.load(out)
    assert deployment.deployer == deployer.address
    assert deployment.chain_id == chain.w3.eth.chain_id
    for name in SUITE_CONTRACTS:
        assert chain.w3.eth.get_code(deployment.address(name)), name
        assert deployment.address(name) in human
    # The deployer is the Registry's oracle, read from the chain, not from our output.
    registry = chain.w3.eth.contract(address=deployment.address("Registry"), abi=chain.Registry.abi)
    role = registry.functions.ORACLE_ROLE().call()
    assert registry.functions.hasRole(role, deployer.address).call()


@ANVIL
def test_deploy_with_a_keystore_in_a_subprocess(
    chain: Any, tmp_path: Path, blendsm_process: Process
) -> None:
    deployer = chain.accounts["validator"]  # TEST ONLY
    keystore = tmp_path / "deployer.json"
    keystore.write_text(json.dumps(Account.encrypt(deployer.key, "test-only-password")))
    env = {**os.environ, "BLENDSM_KEYSTORE_PASSWORD": "test-only-password"}
    proc = blendsm_process(
        "deploy",
        "--chain",
        chain.anvil.url,
        "--keystore",
        str(keystore),
        "--challenge-period",
        "120",
        "--json",
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["deployer"] == deployer.address
    assert out["challenge_period"] == 120
    channels = chain.w3.eth.contract(
        address=out["addresses"]["PaymentChannels"], abi=chain.PaymentChannels.abi
    )
    assert channels.functions.challengePeriod().call() == 120

    env["BLENDSM_KEYSTORE_PASSWORD"] = "wrong"
    proc = blendsm_process(
        "deploy", "--chain", chain.anvil.url, "--keystore", str(keystore), env=env, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "wrong password or corrupt file" in proc.stderr


@ANVIL
async def test_deploy_closes_its_connection_to_the_node(
    chain: Any, tcp_proxy: Callable[[int], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The command closes its kept-alive JSON-RPC connection before it returns (it ran to
    the end of the process, or of the caller's, before: web3 caches the session)."""
    proxy = tcp_proxy(chain.anvil.port)
    await proxy.start()
    monkeypatch.setenv("DEPLOYER_KEY", "0x" + chain.accounts["stranger"].key.hex())
    url = f"http://127.0.0.1:{proxy.port}"
    argv = ["deploy", "--chain", url, "--key-env", "DEPLOYER_KEY", "--json"]
    assert await asyncio.to_thread(main, argv) == 0  # its own asyncio.run, as from a shell
    assert proxy.accepted >= 1
    await eventually(lambda: proxy.links == 0, within=2.0, what="the node's link closed")


@ANVIL
def test_deploy_errors_are_one_clear_line(
    chain: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["deploy", "--chain", chain.anvil.url]) == 2
    assert "needs --key-env or --keystore" in capsys.readouterr().err
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    assert main(["deploy", "--chain", chain.anvil.url, "--key-env", "NOT_SET_ANYWHERE"]) == 2
    assert "NOT_SET_ANYWHERE is not set" in capsys.readouterr().err
    assert main(["deploy", "--chain", "ftp://example"]) == 2
    assert "must be 'embedded', http(s):// or ws(s)://" in capsys.readouterr().err
    monkeypatch.setenv("DEPLOYER_KEY", "0x" + chain.accounts["stranger"].key.hex())
    assert main(["deploy", "--chain", "http://127.0.0.1:1", "--key-env", "DEPLOYER_KEY"]) == 2
    assert "chain endpoint unavailable" in capsys.readouterr().err


@ANVIL
def test_upgrade_adds_brokers_to_a_deployment_that_predates_it(
    chain: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A deployment file written before the Brokers contract: `--upgrade` adds Brokers, the
    one its PaymentChannels already checks lanes against (never a second one), and writes the
    file back; a second run adds nothing."""
    old = dataclasses.replace(
        chain.deployment,
        addresses={k: v for k, v in chain.deployment.addresses.items() if k != "Brokers"},
    )
    path = tmp_path / "deployment.json"
    old.save(path)
    monkeypatch.setenv("DEPLOYER_KEY", "0x" + chain.accounts["stranger"].key.hex())
    argv = [
        "deploy",
        "--chain",
        chain.anvil.url,
        "--key-env",
        "DEPLOYER_KEY",
        "--upgrade",
        str(path),
    ]
    assert main(argv) == 0
    human = capsys.readouterr().out
    assert human.startswith(f"Added Brokers\nCompleted the BlendSM suite on {chain.anvil.url}")
    upgraded = Deployment.load(path)
    assert set(upgraded.addresses) == set(SUITE_CONTRACTS)
    for name in old.addresses:
        assert upgraded.address(name) == old.address(name)
    assert upgraded.block == old.block
    brokers = chain.w3.eth.contract(address=upgraded.address("Brokers"), abi=chain.Brokers.abi)
    assert brokers.functions.registry().call() == old.address("Registry")
    assert brokers.functions.market().call() == old.address("Market")
    assert upgraded.address("Brokers") == chain.deployment.address("Brokers")  # the wired one

    assert main(argv) == 0
    assert capsys.readouterr().out.startswith("Nothing to add: the suite is complete\n")
    assert Deployment.load(path) == upgraded

    other = dataclasses.replace(old, chain_id=old.chain_id + 1)
    other.save(path)
    assert main(argv) == 2
    assert "deployment is for chain id" in capsys.readouterr().err

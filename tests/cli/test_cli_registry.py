"""`blendsm registry ...` against anvil over JSON-RPC: every action in human and JSON form,
checked against the Registry through plain web3, and the errors users meet (not an oracle,
bad address, missing key, stale deployment, node down)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from eth_account import Account

from blendsm.contracts import free_port

pytestmark = pytest.mark.parametrize("chain", ["anvil"], indirect=True)

SELLER, BUYER, OPERATOR, VALIDATOR = 1, 2, 3, 4
PENDING, ACTIVE, REJECTED, REVOKED, LEFT = 1, 2, 3, 4, 5

Run = Callable[..., tuple[int, str, str]]
Process = Callable[..., subprocess.CompletedProcess[str]]  # the conftest's blendsm_process


def participant(chain: Any, label: str) -> tuple[int, int]:
    return tuple(chain.Registry.functions.participant(chain.addr(label)).call())  # type: ignore[return-value]


def check_tx(chain: Any, data: dict[str, Any]) -> None:
    """The JSON's tx, block and gas are those of a successful transaction on the chain."""
    receipt = chain.w3.eth.get_transaction_receipt(data["tx"])
    assert receipt["status"] == 1
    assert receipt["blockNumber"] == data["block"]
    assert receipt["gasUsed"] == data["gas_used"]


def test_apply_then_oracle_approves_human_and_json(chain: Any, cli: Run) -> None:
    code, out, err = cli("registry", "apply", "--role", "seller", key="seller")
    assert (code, err) == (0, "")
    seller = chain.addr("seller")
    assert f"{seller} applied as seller: pending" in out
    tx_hash = out.split(" tx ")[1].split()[0]
    assert chain.w3.eth.get_transaction_receipt(tx_hash)["status"] == 1
    assert participant(chain, "seller") == (SELLER, PENDING)

    code, out, err = cli("registry", "approve", seller.lower(), "--json", key="oracle")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert out.count("\n") == 1
    assert data["action"] == "approve"
    assert data["account"] == seller  # checksummed although given in lower case
    assert data["oracle"] == chain.addr("oracle")
    assert (data["role"], data["status"]) == ("seller", "active")
    check_tx(chain, data)
    assert participant(chain, "seller") == (SELLER, ACTIVE)


def test_apply_json_for_each_role(chain: Any, cli: Run) -> None:
    for label, role, number in (
        ("buyer", "buyer", BUYER),
        ("operator", "operator", OPERATOR),
        ("validator", "validator", VALIDATOR),
    ):
        code, out, _ = cli("registry", "apply", "--role", role, "--json", key=label)
        assert code == 0
        data = json.loads(out)
        assert (data["account"], data["role"], data["status"]) == (
            chain.addr(label),
            role,
            "pending",
        )
        check_tx(chain, data)
        assert participant(chain, label) == (number, PENDING)


def test_reject_and_revoke(chain: Any, cli: Run, enrol: Callable[[str, int], None]) -> None:
    assert cli("registry", "apply", "--role", "buyer", key="buyer")[0] == 0
    code, out, _ = cli("registry", "reject", chain.addr("buyer"), key="oracle")
    assert code == 0
    assert f"{chain.addr('buyer')} rejected (buyer): now rejected" in out
    assert participant(chain, "buyer") == (BUYER, REJECTED)

    enrol("operator", OPERATOR)
    code, out, _ = cli("registry", "revoke", chain.addr("operator"), "--json", key="oracle")
    assert code == 0
    data = json.loads(out)
    assert (data["action"], data["status"]) == ("revoke", "revoked")
    check_tx(chain, data)
    assert participant(chain, "operator") == (OPERATOR, REVOKED)
    assert not chain.Registry.functions.isActive(chain.addr("operator")).call()

    code, out, err = cli("registry", "revoke", chain.addr("operator"), key="oracle")
    assert code == 2
    assert out == ""
    assert err.startswith("blendsm: error: RegistryWrongStatus(")
    assert "status=Status.REVOKED" in err


def test_approve_by_a_non_oracle_fails_naming_the_revert(
    chain: Any, cli: Run, enrol: Callable[[str, int], None]
) -> None:
    assert cli("registry", "apply", "--role", "seller", key="seller")[0] == 0
    code, out, err = cli("registry", "approve", chain.addr("seller"), key="stranger")
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1
    assert err == (
        "blendsm: error: AccessControlUnauthorizedAccount("
        f"account='{chain.addr('stranger')}', needs='oracle')\n"
    )
    assert participant(chain, "seller") == (SELLER, PENDING)  # nothing changed


def test_leave_human_and_json(chain: Any, cli: Run, enrol: Callable[[str, int], None]) -> None:
    enrol("buyer", BUYER)
    code, out, _ = cli("registry", "leave", key="buyer")
    assert code == 0
    assert f"{chain.addr('buyer')} left the marketplace" in out
    assert participant(chain, "buyer") == (BUYER, LEFT)
    assert cli("registry", "apply", "--role", "buyer", key="buyer")[0] == 0
    code, out, _ = cli("registry", "leave", "--json", key="buyer")
    data = json.loads(out)
    assert (data["action"], data["status"], data["account"]) == (
        "leave",
        "left",
        chain.addr("buyer"),
    )
    check_tx(chain, data)
    code, _, err = cli("registry", "leave", key="buyer")
    assert code == 2
    assert "RegistryWrongStatus" in err


def test_status_of_an_address_of_the_signer_and_of_a_device(
    chain: Any, cli: Run, enrol: Callable[[str, int], None]
) -> None:
    enrol("seller", SELLER)
    code, out, _ = cli("registry", "status", chain.addr("seller"))
    assert code == 0
    assert out.splitlines()[:4] == [
        f"account       {chain.addr('seller')}",
        "role          seller",
        "status        active",
        "oracle        no",
    ]
    assert "devices       0" in out

    code, out, _ = cli("registry", "status", "--json", key="oracle")  # default: the signer
    data = json.loads(out)
    assert data == {
        "account": chain.addr("oracle"),
        "active": False,
        "device_count": 0,
        "device_of": None,
        "oracle": True,
        "role": "none",
        "status": "none",
    }
    assert chain.Registry.functions.hasRole(
        chain.Registry.functions.ORACLE_ROLE().call(), chain.addr("oracle")
    ).call()

    assert cli("registry", "devices", "add", chain.addr("device"), key="seller")[0] == 0
    code, out, _ = cli("registry", "status", chain.addr("device"), "--json")
    data = json.loads(out)
    assert data["device_of"] == chain.addr("seller")
    assert chain.Registry.functions.deviceOwner(chain.addr("device")).call() == data["device_of"]


def test_status_without_address_or_key_is_a_clear_error(cli: Run) -> None:
    code, out, err = cli("registry", "status")
    assert code == 2
    assert out == ""
    assert err.startswith("blendsm: error: give ADDRESS, or a key ($BLENDSM_KEY or --keystore)")


def test_pending_lists_only_applicants_still_waiting(
    chain: Any, cli: Run, enrol: Callable[[str, int], None]
) -> None:
    code, out, _ = cli("registry", "pending")
    assert (code, out) == (0, "no pending applications\n")
    enrol("seller", SELLER)
    for label, role in (("buyer", "buyer"), ("buyer2", "buyer"), ("validator", "validator")):
        assert cli("registry", "apply", "--role", role, key=label)[0] == 0
    assert cli("registry", "reject", chain.addr("buyer2"), key="oracle")[0] == 0
    code, out, _ = cli("registry", "pending", "--json")
    pending = json.loads(out)["pending"]
    assert [(p["account"], p["role"]) for p in pending] == [
        (chain.addr("buyer"), "buyer"),
        (chain.addr("validator"), "validator"),
    ]
    for p in pending:
        assert chain.Registry.functions.participant(p["account"]).call()[1] == PENDING
    code, out, _ = cli("registry", "pending")
    lines = out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{chain.addr('buyer')}  buyer ")


def test_devices_add_list_remove(chain: Any, cli: Run, enrol: Callable[[str, int], None]) -> None:
    enrol("seller", SELLER)
    device, device2 = chain.addr("device"), chain.addr("device2")
    code, out, _ = cli("registry", "devices", "add", device, key="seller")
    assert code == 0
    assert f"device {device} registered to {chain.addr('seller')} (1 device now)" in out
    code, out, _ = cli("registry", "devices", "add", device2.lower(), "--json", key="seller")
    data = json.loads(out)
    assert (data["device"], data["seller"], data["device_count"]) == (
        device2,
        chain.addr("seller"),
        2,
    )
    check_tx(chain, data)
    reg = chain.Registry.functions
    assert reg.deviceOwner(device).call() == reg.deviceOwner(device2).call() == chain.addr("seller")

    code, out, _ = cli("registry", "devices", "list", chain.addr("seller"), "--json")
    assert json.loads(out) == {
        "device_count": 2,
        "devices": [device, device2],
        "seller": chain.addr("seller"),
    }

    code, out, _ = cli("registry", "devices", "remove", device, key="seller")
    assert code == 0
    assert f"device {device} released by {chain.addr('seller')} (1 device now)" in out
    assert reg.deviceOwner(device).call() == "0x" + "00" * 20
    assert reg.deviceCount(chain.addr("seller")).call() == 1

    code, out, _ = cli("registry", "devices", "list", key="seller")  # default: the signer
    assert out == f"1 device of {chain.addr('seller')}\n  {device2}\n"

    # A device moved to another seller is listed there, not here.
    enrol("buyer", SELLER)
    assert cli("registry", "devices", "add", device, key="buyer")[0] == 0
    code, out, _ = cli("registry", "devices", "list", chain.addr("buyer"), "--json")
    assert json.loads(out)["devices"] == [device]
    code, out, _ = cli("registry", "devices", "list", chain.addr("seller"), "--json")
    assert json.loads(out)["devices"] == [device2]

    code, out, _ = cli("registry", "devices", "remove", "--json", device2, key="seller")
    assert code == 0
    assert json.loads(out)["device_count"] == 0
    code, out, _ = cli("registry", "devices", "list", chain.addr("seller"))
    assert out == f"0 devices of {chain.addr('seller')}\n"


def test_device_errors_name_the_revert(
    chain: Any, cli: Run, enrol: Callable[[str, int], None]
) -> None:
    code, _, err = cli("registry", "devices", "add", chain.addr("device"), key="buyer")
    assert code == 2
    assert err == f"blendsm: error: RegistryNotActiveSeller(account='{chain.addr('buyer')}')\n"
    code, _, err = cli("registry", "devices", "remove", chain.addr("device"), key="seller")
    assert code == 2
    assert "RegistryNotDeviceOwner" in err


def test_bad_input_and_missing_key(chain: Any, cli: Run, tmp_path: Path) -> None:
    code, out, err = cli("registry", "approve", "0x1234", key="oracle")
    assert (code, out) == (2, "")
    assert err == "blendsm: error: ADDRESS: not an address: '0x1234'\n"
    code, _, err = cli("registry", "devices", "add", "nope", key="seller")
    assert code == 2
    assert err == "blendsm: error: DEVICE: not an address: 'nope'\n"
    code, _, err = cli("registry", "apply", "--role", "seller")
    assert code == 2
    assert err.startswith("blendsm: error: environment variable BLENDSM_KEY is not set")
    code, _, err = cli("registry", "leave", "--key-env", "NO_SUCH_KEY_VAR")
    assert code == 2
    assert "NO_SUCH_KEY_VAR is not set" in err
    assert participant(chain, "seller") == (0, 0)


def test_unreadable_deployment_wrong_chain_and_node_down(
    chain: Any, cli: Run, tmp_path: Path
) -> None:
    missing = tmp_path / "nowhere.json"
    code, _, err = cli("registry", "status", chain.addr("seller"), "--deployment", str(missing))
    assert code == 2
    assert f"deployment file {missing} does not exist" in err

    other = tmp_path / "other.json"
    dataclasses.replace(chain.deployment, chain_id=chain.deployment.chain_id + 1).save(other)
    code, _, err = cli("registry", "status", chain.addr("seller"), "--deployment", str(other))
    assert code == 2
    assert f"deployment is for chain id {chain.deployment.chain_id + 1}" in err

    down = f"http://127.0.0.1:{free_port()}"
    code, out, err = cli("registry", "apply", "--role", "buyer", "--chain", down, key="buyer")
    assert (code, out) == (2, "")
    assert err.startswith("blendsm: error: ")
    assert err.count("\n") == 1
    assert "unavailable" in err
    assert f"127.0.0.1:{down.rsplit(':', 1)[1]}" in err
    assert participant(chain, "buyer") == (0, 0)


def test_keystore_signs(
    chain: Any, cli: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    keystore = tmp_path / "key.json"
    keystore.write_text(json.dumps(Account.encrypt(chain.accounts["validator"].key, "s3cret")))
    monkeypatch.setenv("MY_PASSWORD", "s3cret")
    code, out, err = cli(
        "registry", "apply", "--role", "validator", "--keystore", str(keystore),
        "--password-env", "MY_PASSWORD", "--json",
    )  # fmt: skip
    assert (code, err) == (0, "")
    assert json.loads(out)["account"] == chain.addr("validator")
    assert participant(chain, "validator") == (VALIDATOR, PENDING)
    monkeypatch.setenv("MY_PASSWORD", "wrong")
    code, _, err = cli(
        "registry", "leave", "--keystore", str(keystore), "--password-env", "MY_PASSWORD"
    )
    assert code == 2
    assert "cannot decrypt keystore" in err
    assert participant(chain, "validator") == (VALIDATOR, PENDING)


def test_subprocess_exit_codes_and_stdout(
    chain: Any, deployment_file: Path, blendsm_process: Process
) -> None:
    env = {**os.environ, "BLENDSM_KEY": "0x" + chain.accounts["buyer"].key.hex()}
    env["BLENDSM_CHAIN"], env["BLENDSM_DEPLOYMENT"] = chain.anvil.url, str(deployment_file)
    done = blendsm_process("registry", "apply", "--role", "buyer", "--json", env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["status"] == "pending"
    assert participant(chain, "buyer") == (BUYER, PENDING)
    done = blendsm_process("registry", "approve", chain.addr("buyer"), env=env)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.startswith("blendsm: error: AccessControlUnauthorizedAccount(")
    assert participant(chain, "buyer") == (BUYER, PENDING)

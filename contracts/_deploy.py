"""Deploying the marketplace suite and remembering where it went.

:func:`deploy_suite` deploys Registry, PaymentChannels, Ratings, Market, DataAnchors and Brokers in
one call, to the embedded chain or any JSON-RPC endpoint; :class:`Deployment` is what a
broker or client needs to find them again (chain id, addresses, block), saved as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from eth_account.signers.local import LocalAccount
from eth_utils import to_checksum_address
from web3 import AsyncWeb3
from web3.contract import AsyncContract

from blendsm import atomic_write_text
from blendsm.contracts._artifacts import (
    LATER_CONTRACTS,
    SUITE_CONTRACTS,
    load_artifact,
    load_manifest,
)
from blendsm.contracts._revert import chain_errors
from blendsm.contracts._transactor import Transactor
from blendsm.errors import ConfigError, TransactionFailedError

__all__ = [
    "DEFAULT_CHALLENGE_PERIOD",
    "Deployment",
    "contract_at",
    "deploy_contract",
    "deploy_later_contracts",
    "deploy_suite",
]

#: One day: long enough for a broker that was down for hours to claim before a payer exits.
DEFAULT_CHALLENGE_PERIOD = 24 * 3600


@dataclass(frozen=True, slots=True)
class Deployment:
    """Where the suite lives: chain, contract addresses and the block it was deployed at."""

    chain_id: int
    addresses: dict[str, str]
    block: int
    deployer: str
    challenge_period: int
    compiler_version: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def address(self, name: str) -> str:
        try:
            return self.addresses[name]
        except KeyError:
            raise ConfigError(f"deployment has no address for {name!r}") from None

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Deployment:
        try:
            raw = json.loads(text)
            addresses = {str(k): str(to_checksum_address(v)) for k, v in raw["addresses"].items()}
            dep = cls(
                chain_id=int(raw["chain_id"]),
                addresses=addresses,
                block=int(raw["block"]),
                deployer=to_checksum_address(raw["deployer"]),
                challenge_period=int(raw["challenge_period"]),
                compiler_version=str(raw.get("compiler_version", "")),
                extra={str(k): str(v) for k, v in raw.get("extra", {}).items()},
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"invalid deployment file: {exc}") from exc
        missing = [
            n for n in SUITE_CONTRACTS if n not in dep.addresses and n not in LATER_CONTRACTS
        ]
        if missing:
            raise ConfigError(f"deployment file lacks addresses for {', '.join(missing)}")
        return dep

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write atomically, so a crash never leaves half a file."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Deployment:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read deployment file {path}: {exc}") from exc
        return cls.from_json(text)


def contract_at(w3: AsyncWeb3[Any], name: str, address: str) -> AsyncContract:
    """A web3 contract object for artifact ``name`` at ``address``."""
    return w3.eth.contract(address=to_checksum_address(address), abi=load_artifact(name)["abi"])


async def deploy_contract(transactor: Transactor, name: str, *args: Any) -> AsyncContract:
    """Deploy one artifact with constructor ``args``; returns the contract at its address."""
    artifact = load_artifact(name)
    factory = transactor.w3.eth.contract(abi=artifact["abi"], bytecode=artifact["bytecode"])
    receipt = await transactor.send(factory.constructor(*args))
    address = receipt["contractAddress"]
    if address is None:
        raise TransactionFailedError(f"deploying {name} created no contract")
    return contract_at(transactor.w3, name, address)


async def deploy_suite(
    w3: AsyncWeb3[Any],
    deployer: LocalAccount,
    *,
    challenge_period: int = DEFAULT_CHALLENGE_PERIOD,
    confirmations: int = 0,
) -> Deployment:
    """Deploy the six marketplace contracts; ``deployer`` becomes the Registry's oracle."""
    if challenge_period <= 0:
        raise ConfigError("challenge_period must be positive")
    tx = Transactor(w3, deployer, confirmations=confirmations)
    registry = await deploy_contract(tx, "Registry", deployer.address)
    channels = await deploy_contract(tx, "PaymentChannels", challenge_period)
    ratings = await deploy_contract(tx, "Ratings", channels.address, registry.address)
    market = await deploy_contract(tx, "Market", registry.address, ratings.address)
    anchors = await deploy_contract(tx, "DataAnchors", registry.address)
    brokers = await deploy_contract(tx, "Brokers", registry.address, market.address)
    # Brokers is built on Market, Market on Ratings, Ratings on PaymentChannels: the channel
    # contract cannot take Brokers in its constructor, so its deployer wires it once here.
    await tx.send(channels.functions.setBrokers(brokers.address))
    block = await w3.eth.block_number
    return Deployment(
        chain_id=await w3.eth.chain_id,
        addresses={
            "Registry": registry.address,
            "PaymentChannels": channels.address,
            "Ratings": ratings.address,
            "Market": market.address,
            "DataAnchors": anchors.address,
            "Brokers": brokers.address,
        },
        block=block,
        deployer=deployer.address,
        challenge_period=challenge_period,
        compiler_version=str(load_manifest()["compilerVersion"]),
    )


async def deploy_later_contracts(
    w3: AsyncWeb3[Any], deployer: LocalAccount, deployment: Deployment, *, confirmations: int = 0
) -> Deployment:
    """Deploy the suite contracts an older ``deployment`` lacks (``LATER_CONTRACTS``: Brokers),
    wired to its Registry and Market; the deployment with their addresses added.

    Lanes: PaymentChannels checks a lane against the one Brokers contract wired into it. If it
    is wired already, that address is adopted (never a second Brokers); if not, a new Brokers
    is deployed and wired, which only the PaymentChannels deployer may do. A PaymentChannels
    from before lanes (voucher domain version 1) cannot be upgraded in place (it holds the
    deposits, and Ratings is bound to it): that is refused, deploy a fresh suite.
    Otherwise anyone may run it: Brokers has no admin. The deployment block stays: events of
    the new contracts come later, so following from the old block sees them all.
    """
    with chain_errors("chain id"):
        chain_id = int(await w3.eth.chain_id)
    if chain_id != deployment.chain_id:
        raise ConfigError(
            f"deployment is for chain id {deployment.chain_id}, the endpoint is chain id {chain_id}"
        )
    addresses = dict(deployment.addresses)
    tx = Transactor(w3, deployer, confirmations=confirmations)
    channels = contract_at(w3, "PaymentChannels", deployment.address("PaymentChannels"))
    with chain_errors("PaymentChannels.eip712Domain"):
        version = str((await channels.functions.eip712Domain().call())[2])
    if version != "2":
        raise ConfigError(
            f"PaymentChannels at {channels.address} has voucher domain version {version!r},"
            " before lanes: it cannot be upgraded in place (it holds the deposits); deploy a"
            " fresh suite"
        )
    with chain_errors("PaymentChannels.brokers"):
        wired = str(await channels.functions.brokers().call())
    if int(wired, 16) != 0:
        if addresses.get("Brokers", wired) != to_checksum_address(wired):
            raise ConfigError(
                f"the deployment names Brokers {addresses['Brokers']}, its PaymentChannels"
                f" checks lanes against {wired}"
            )
        addresses["Brokers"] = to_checksum_address(wired)
        return dataclasses.replace(deployment, addresses=addresses)
    with chain_errors("PaymentChannels.deployer"):
        owner = str(await channels.functions.deployer().call())
    if owner.lower() != deployer.address.lower():
        raise ConfigError(f"only the PaymentChannels deployer {owner} can wire its Brokers")
    if "Brokers" not in addresses:
        brokers = await deploy_contract(
            tx, "Brokers", deployment.address("Registry"), deployment.address("Market")
        )
        addresses["Brokers"] = brokers.address
    await tx.send(channels.functions.setBrokers(addresses["Brokers"]))
    return dataclasses.replace(deployment, addresses=addresses)

"""``blendsm registry ...``: membership (apply, approve, reject, revoke, leave, status,
pending) and a seller's devices (add, remove, list).

The Registry cannot enumerate applicants or devices, so ``pending`` and ``devices list``
replay its events from the deployment block and confirm every candidate against the current
state (``participant``, ``deviceOwner``): the events say who might be there, the state says
who is.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from blendsm.cli._support import (
    DEFAULT_KEY_ENV,
    Output,
    add_chain_command,
    add_command_group,
    address_topic,
    arg,
    fetch_events,
    parse_address,
    run_chain_command,
    signing_account,
    tx_output,
)
from blendsm.errors import ChainError, ConfigError, ContractRevertError

if TYPE_CHECKING:
    from blendsm.contracts import ChainEvent, Marketplace, Participant, TxResult

__all__ = ["register"]

_ROLES = ("seller", "buyer", "operator", "validator")
_DEVICE_ARG = arg("device", metavar="DEVICE", help="the device's address")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``registry`` and its actions to the ``blendsm`` parser."""
    actions = add_command_group(
        sub, "registry", help="marketplace membership (apply, approve, revoke, ...) and devices"
    )

    add_chain_command(
        actions,
        "apply",
        _cmd_apply,
        signing=True,
        help="apply for a role as the signer",
        arguments=[arg("--role", required=True, choices=_ROLES, help="the role asked for")],
    )
    for name, verb in (
        ("approve", "admit a pending applicant"),
        ("reject", "reject a pending applicant"),
        ("revoke", "ban a participant for good (leaving does not dodge it)"),
    ):
        add_chain_command(
            actions,
            name,
            _cmd_oracle,
            signing=True,
            help=f"{verb} (oracle only)",
            arguments=[arg("address", metavar="ADDRESS", help="the participant")],
            defaults={"oracle_action": name},
        )
    add_chain_command(
        actions, "leave", _cmd_leave, signing=True, help="leave the marketplace as the signer"
    )
    add_chain_command(
        actions,
        "status",
        _cmd_status,
        signing=True,
        help="role and status of an account (default: the signer's)",
        arguments=[
            arg("address", nargs="?", metavar="ADDRESS", help="the account (default: the signer)")
        ],
    )
    add_chain_command(
        actions, "pending", _cmd_pending, signing=False, help="applicants waiting for an oracle"
    )

    dsub = add_command_group(actions, "devices", help="a seller's devices")
    for name, adding, text in (
        ("add", True, "register a device to the signing seller"),
        ("remove", False, "release one of the signing seller's devices"),
    ):
        add_chain_command(
            dsub,
            name,
            _cmd_device_change,
            signing=True,
            help=text,
            arguments=[_DEVICE_ARG],
            defaults={"adding": adding},
        )
    add_chain_command(
        dsub,
        "list",
        _cmd_device_list,
        signing=True,
        help="devices registered to a seller now (default: the signer)",
        arguments=[
            arg("seller", nargs="?", metavar="SELLER", help="the seller (default: the signer)")
        ],
    )


def _signer_or(args: argparse.Namespace, given: str | None, what: str) -> str:
    """``given`` checked, else the signer's address; neither is a clear error."""
    if given is not None:
        return parse_address(given, what)
    try:
        return str(signing_account(args).address)
    except ConfigError as exc:
        key_env = getattr(args, "key_env", None) or DEFAULT_KEY_ENV
        raise ConfigError(
            f"give {what.upper()}, or a key (${key_env} or --keystore) to use the signer's"
            f" address ({exc})"
        ) from None


def _membership(
    result: TxResult, action: str, account: str, now: Participant, line: str, **more: Any
) -> Output:
    """The output of the membership change ``result`` of ``account``, ``now`` its state after."""
    data = {
        "action": action,
        "account": account,
        **more,
        "role": now.role.name.lower(),
        "status": now.status.name.lower(),
    }
    return tx_output(result, data, line)


# --- commands ----------------------------------------------------------------------------


def _cmd_apply(args: argparse.Namespace) -> int:
    from blendsm.contracts import Role

    role = Role[args.role.upper()]

    async def body(mp: Marketplace) -> Output:
        result = await mp.registry.apply_for_role(role)
        assert mp.address is not None
        now = await mp.registry.participant(mp.address)
        return _membership(
            result,
            "apply",
            mp.address,
            now,
            f"{mp.address} applied as {now.role.name.lower()}: {now.status.name.lower()},"
            " waiting for an oracle",
        )

    return run_chain_command(args, body, signing=True)


def _cmd_oracle(args: argparse.Namespace) -> int:
    account = parse_address(args.address, "ADDRESS")
    action: str = args.oracle_action
    past = {"approve": "approved", "reject": "rejected", "revoke": "revoked"}[action]

    async def body(mp: Marketplace) -> Output:
        send = {
            "approve": mp.registry.approve,
            "reject": mp.registry.reject,
            "revoke": mp.registry.revoke,
        }[action]
        try:
            result = await send(account)
        except ContractRevertError as exc:
            if exc.error_name != "AccessControlUnauthorizedAccount":
                raise
            raise ContractRevertError(
                exc.error_name, {"account": exc.error_args.get("account"), "needs": "oracle"}
            ) from exc
        now = await mp.registry.participant(account)
        role, status = now.role.name.lower(), now.status.name.lower()
        line = f"{account} {past} ({role}): now {status}"
        return _membership(result, action, account, now, line, oracle=mp.address)

    return run_chain_command(args, body, signing=True)


def _cmd_leave(args: argparse.Namespace) -> int:
    async def body(mp: Marketplace) -> Output:
        result = await mp.registry.leave()
        assert mp.address is not None
        now = await mp.registry.participant(mp.address)
        line = f"{mp.address} left the marketplace (may apply again)"
        return _membership(result, "leave", mp.address, now, line)

    return run_chain_command(args, body, signing=True)


def _cmd_status(args: argparse.Namespace) -> int:
    account = _signer_or(args, args.address, "address")

    async def body(mp: Marketplace) -> Output:
        who = await mp.registry.participant(account)
        oracle = await mp.registry.is_oracle(account)
        devices = await mp.registry.device_count(account)
        owner = await mp.registry.device_owner(account)
        data: dict[str, Any] = {
            "account": account,
            "role": who.role.name.lower(),
            "status": who.status.name.lower(),
            "active": who.active,
            "oracle": oracle,
            "device_count": devices,
            "device_of": owner,
        }
        lines = [
            f"account       {account}",
            f"role          {who.role.name.lower()}",
            f"status        {who.status.name.lower()}",
            f"oracle        {'yes' if oracle else 'no'}",
        ]
        if devices or who.role.name == "SELLER":
            lines.append(f"devices       {devices}")
        if owner is not None:
            lines.append(f"device of     {owner}")
        return data, lines

    return run_chain_command(args, body, signing=False)


def _cmd_pending(args: argparse.Namespace) -> int:
    async def body(mp: Marketplace) -> Output:
        applied = await fetch_events(mp, ["Registry.Applied"])
        latest: dict[str, ChainEvent] = {e.args["account"]: e for e in applied}
        pending = []
        for account, event in latest.items():
            now = await mp.registry.participant(account)
            if now.status.name == "PENDING":
                pending.append((account, now.role.name.lower(), event.block_number))
        return (
            {"pending": [{"account": a, "role": r, "applied_block": b} for a, r, b in pending]},
            [f"{a}  {r:<9}  applied in block {b}" for a, r, b in pending]
            or ["no pending applications"],
        )

    return run_chain_command(args, body, signing=False)


def _cmd_device_change(args: argparse.Namespace) -> int:
    device = parse_address(args.device, "DEVICE")
    adding: bool = args.adding

    async def body(mp: Marketplace) -> Output:
        if adding:
            result = await mp.registry.add_device(device)
        else:
            result = await mp.registry.remove_device(device)
        assert mp.address is not None
        count = await mp.registry.device_count(mp.address)
        data = {
            "action": "add_device" if adding else "remove_device",
            "device": device,
            "seller": mp.address,
            "device_count": count,
        }
        return tx_output(
            result,
            data,
            f"device {device} {'registered to' if adding else 'released by'} {mp.address}"
            f" ({count} device{'' if count == 1 else 's'} now)",
        )

    return run_chain_command(args, body, signing=True)


def _cmd_device_list(args: argparse.Namespace) -> int:
    seller = _signer_or(args, args.seller, "seller")

    async def body(mp: Marketplace) -> Output:
        events = await fetch_events(
            mp, ["Registry.DeviceAdded", "Registry.DeviceRemoved"], [address_topic(seller)]
        )
        candidates = list(dict.fromkeys(e.args["device"] for e in events))
        devices = [d for d in candidates if await mp.registry.device_owner(d) == seller]
        count = await mp.registry.device_count(seller)
        if count != len(devices):  # the events and the state disagree: a node pruned logs?
            raise ChainError(
                f"Registry.deviceCount({seller}) is {count} but the events show {len(devices)}"
                " devices; does the endpoint serve every log since the deployment block?"
            )
        return (
            {"seller": seller, "devices": devices, "device_count": count},
            [f"{len(devices)} device{'' if count == 1 else 's'} of {seller}"]
            + [f"  {d}" for d in devices],
        )

    return run_chain_command(args, body, signing=False)

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

from blendsm.broker._cli_support import (
    DEFAULT_KEY_ENV,
    add_chain_arguments,
    address_topic,
    emit,
    fetch_events,
    open_marketplace,
    parse_address,
    run_async,
    signing_account,
    tx_json,
    tx_line,
)
from blendsm.errors import ChainError, ConfigError, ContractRevertError

if TYPE_CHECKING:
    from blendsm.contracts._events import ChainEvent

__all__ = ["register"]

_ROLES = ("seller", "buyer", "operator", "validator")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``registry`` and its actions to the ``blendsm`` parser."""
    registry = sub.add_parser(
        "registry", help="marketplace membership (apply, approve, revoke, ...) and devices"
    )
    actions = registry.add_subparsers(dest="registry_command", metavar="ACTION", required=True)

    apply = actions.add_parser("apply", help="apply for a role as the signer")
    apply.add_argument("--role", required=True, choices=_ROLES, help="the role asked for")
    add_chain_arguments(apply, signing=True)
    apply.set_defaults(func=_cmd_apply)

    for name, verb in (
        ("approve", "admit a pending applicant"),
        ("reject", "reject a pending applicant"),
        ("revoke", "ban a participant for good (leaving does not dodge it)"),
    ):
        action = actions.add_parser(name, help=f"{verb} (oracle only)")
        action.add_argument("address", metavar="ADDRESS", help="the participant")
        add_chain_arguments(action, signing=True)
        action.set_defaults(func=_cmd_oracle, oracle_action=name)

    leave = actions.add_parser("leave", help="leave the marketplace as the signer")
    add_chain_arguments(leave, signing=True)
    leave.set_defaults(func=_cmd_leave)

    status = actions.add_parser(
        "status", help="role and status of an account (default: the signer's)"
    )
    status.add_argument(
        "address", nargs="?", metavar="ADDRESS", help="the account (default: the signer)"
    )
    add_chain_arguments(status, signing=True)
    status.set_defaults(func=_cmd_status)

    pending = actions.add_parser("pending", help="applicants waiting for an oracle")
    add_chain_arguments(pending, signing=False)
    pending.set_defaults(func=_cmd_pending)

    devices = actions.add_parser("devices", help="a seller's devices")
    dsub = devices.add_subparsers(dest="devices_command", metavar="ACTION", required=True)
    add = dsub.add_parser("add", help="register a device to the signing seller")
    add.add_argument("device", metavar="DEVICE", help="the device's address")
    add_chain_arguments(add, signing=True)
    add.set_defaults(func=_cmd_device_change, adding=True)
    remove = dsub.add_parser("remove", help="release one of the signing seller's devices")
    remove.add_argument("device", metavar="DEVICE", help="the device's address")
    add_chain_arguments(remove, signing=True)
    remove.set_defaults(func=_cmd_device_change, adding=False)
    listing = dsub.add_parser(
        "list", help="devices registered to a seller now (default: the signer)"
    )
    listing.add_argument(
        "seller", nargs="?", metavar="SELLER", help="the seller (default: the signer)"
    )
    add_chain_arguments(listing, signing=True)
    listing.set_defaults(func=_cmd_device_list)


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


# --- commands ----------------------------------------------------------------------------


def _cmd_apply(args: argparse.Namespace) -> int:
    from blendsm.contracts import Role

    role = Role[args.role.upper()]

    async def run() -> None:
        async with open_marketplace(args, signing=True) as mp:
            result = await mp.registry.apply_for_role(role)
            assert mp.address is not None
            now = await mp.registry.participant(mp.address)
        emit(
            args,
            {
                "action": "apply",
                "account": mp.address,
                "role": now.role.name.lower(),
                "status": now.status.name.lower(),
                **tx_json(result),
            },
            [
                f"{mp.address} applied as {now.role.name.lower()}: {now.status.name.lower()},"
                " waiting for an oracle",
                tx_line(result),
            ],
        )

    run_async(run)
    return 0


def _cmd_oracle(args: argparse.Namespace) -> int:
    account = parse_address(args.address, "ADDRESS")
    action: str = args.oracle_action
    past = {"approve": "approved", "reject": "rejected", "revoke": "revoked"}[action]

    async def run() -> None:
        async with open_marketplace(args, signing=True) as mp:
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
        emit(
            args,
            {
                "action": action,
                "account": account,
                "oracle": mp.address,
                "role": role,
                "status": status,
                **tx_json(result),
            },
            [f"{account} {past} ({role}): now {status}", tx_line(result)],
        )

    run_async(run)
    return 0


def _cmd_leave(args: argparse.Namespace) -> int:
    async def run() -> None:
        async with open_marketplace(args, signing=True) as mp:
            result = await mp.registry.leave()
            assert mp.address is not None
            now = await mp.registry.participant(mp.address)
        emit(
            args,
            {
                "action": "leave",
                "account": mp.address,
                "role": now.role.name.lower(),
                "status": now.status.name.lower(),
                **tx_json(result),
            },
            [f"{mp.address} left the marketplace (may apply again)", tx_line(result)],
        )

    run_async(run)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    account = _signer_or(args, args.address, "address")

    async def run() -> None:
        async with open_marketplace(args, signing=False) as mp:
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
        emit(args, data, lines)

    run_async(run)
    return 0


def _cmd_pending(args: argparse.Namespace) -> int:
    async def run() -> None:
        async with open_marketplace(args, signing=False) as mp:
            applied = await fetch_events(mp, ["Registry.Applied"])
            latest: dict[str, ChainEvent] = {e.args["account"]: e for e in applied}
            pending = []
            for account, event in latest.items():
                now = await mp.registry.participant(account)
                if now.status.name == "PENDING":
                    pending.append((account, now.role.name.lower(), event.block_number))
        emit(
            args,
            {"pending": [{"account": a, "role": r, "applied_block": b} for a, r, b in pending]},
            [f"{a}  {r:<9}  applied in block {b}" for a, r, b in pending]
            or ["no pending applications"],
        )

    run_async(run)
    return 0


def _cmd_device_change(args: argparse.Namespace) -> int:
    device = parse_address(args.device, "DEVICE")
    adding: bool = args.adding

    async def run() -> None:
        async with open_marketplace(args, signing=True) as mp:
            if adding:
                result = await mp.registry.add_device(device)
            else:
                result = await mp.registry.remove_device(device)
            assert mp.address is not None
            count = await mp.registry.device_count(mp.address)
        emit(
            args,
            {
                "action": "add_device" if adding else "remove_device",
                "device": device,
                "seller": mp.address,
                "device_count": count,
                **tx_json(result),
            },
            [
                f"device {device} {'registered to' if adding else 'released by'} {mp.address}"
                f" ({count} device{'' if count == 1 else 's'} now)",
                tx_line(result),
            ],
        )

    run_async(run)
    return 0


def _cmd_device_list(args: argparse.Namespace) -> int:
    seller = _signer_or(args, args.seller, "seller")

    async def run() -> None:
        async with open_marketplace(args, signing=False) as mp:
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
        emit(
            args,
            {"seller": seller, "devices": devices, "device_count": count},
            [f"{len(devices)} device{'' if count == 1 else 's'} of {seller}"]
            + [f"  {d}" for d in devices],
        )

    run_async(run)
    return 0

"""``blendsm anchors list`` and ``blendsm anchors verify``: a broker's anchored batch roots
and inclusion proofs checked against them.

``verify`` trusts neither the broker nor the node alone: a proof holds only when
``DataAnchors.verify`` says so on chain AND the root recomputed here from the leaf and the
proof (:func:`blendsm.device_sdk.process_proof`) equals the root read from ``anchorOf``. It exits
1 when a proof does not hold, like ``blendsm verify``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from blendsm.cli._support import (
    Output,
    add_chain_command,
    add_command_group,
    address_topic,
    arg,
    emit,
    fetch_events,
    format_time,
    open_marketplace,
    parse_address,
    parse_bytes32,
    run_async,
    run_chain_command,
)
from blendsm.errors import ConfigError, WireError

if TYPE_CHECKING:
    from blendsm.contracts import Marketplace

__all__ = ["register"]

_PROOF_FILE_HELP = """\
--proof-file FILE holds one of (JSON, amounts as integers or decimal strings):
  - a proof as the broker sends it over MQTT on blendsm/ctl/<address>/notice:
    {"type": "proof", "batch": "7", "leaf": "0x..", "proof": ["0x..", ...], "root": "0x..",
     "topic": .., "sequence": .., "device": .., "index": .., "tx": .., "request_id": ..}
  - a proof line of a Subscriber record file (record_path), which names the broker:
    {"type": "proof", "broker": "0x..", "batch": 7, "leaf": .., "proof": [..], ...}
  - a whole record file (one JSON object per line): every "proof" line is checked,
    "message" lines are skipped (`blendsm verify FILE` re-checks the messages themselves)
  - the bare minimum: {"batch": 7, "leaf": "0x..", "proof": ["0x..", ...]} (+ "broker")
--broker overrides the broker named in the file; it is needed when the file names none.
The leaf is taken as given: to check that it is the leaf of a message you received, use
`blendsm verify` on the record file, which recomputes leaves from the envelopes."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``anchors list`` and ``anchors verify``."""
    asub = add_command_group(
        sub, "anchors", help="Merkle roots anchored by broker operators: list, verify proofs"
    )

    add_chain_command(
        asub,
        "list",
        _cmd_list,
        signing=False,
        help="a broker's anchored batches, most recent first",
        description="A broker operator's anchored batches (from the Anchored events since"
        " the deployment block), most recent first: batch id, root, leaf count, time, block.",
        arguments=[
            arg(
                "--broker", required=True, metavar="OPERATOR", help="address of the broker operator"
            ),
            arg(
                "--limit",
                type=int,
                default=20,
                metavar="N",
                help="show at most N batches, 0 for all (default: %(default)s)",
            ),
        ],
    )
    add_chain_command(
        asub,
        "verify",
        _cmd_verify,
        signing=False,
        help="check that a leaf is in an anchored batch (exit 1 if the proof does not hold)",
        description="Check an inclusion proof against a broker's anchored batch root, on chain"
        " (DataAnchors.verify) and off chain (the root recomputed from leaf and proof must be"
        " the anchored one). Exit 0 when every proof holds, 1 when one does not.",
        epilog=_PROOF_FILE_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        arguments=[
            arg("--broker", metavar="OPERATOR", help="address of the broker operator"),
            arg("--batch", type=int, metavar="N", help="the batch id"),
            arg("--leaf", metavar="0x..", help="the leaf hash (32 bytes)"),
            arg(
                "--proof",
                metavar="0x..,0x..",
                help="sibling hashes from the leaf up, comma-separated (empty: a batch of one"
                " leaf)",
            ),
            arg("--proof-file", type=Path, metavar="FILE", help="a proof in JSON (see below)"),
        ],
    )


# --- list ----------------------------------------------------------------------------------


def _cmd_list(args: argparse.Namespace) -> int:
    broker = parse_address(args.broker, "--broker")
    if args.limit < 0:
        raise ConfigError(f"--limit: must be 0 (all) or more, got {args.limit}")

    async def body(mp: Marketplace) -> Output:
        latest = await mp.anchors.latest_batch_id(broker)
        events = await fetch_events(mp, ["DataAnchors.Anchored"], [address_topic(broker)])
        newest = sorted(events, key=lambda e: int(e.args["batchId"]), reverse=True)
        shown = newest[: args.limit] if args.limit else newest
        rows: list[dict[str, Any]] = []
        for event in shown:
            batch_id = int(event.args["batchId"])
            info = await mp.anchors.anchor_of(broker, batch_id)
            if info is None:  # an event of a reorged-away block: trust the state
                continue
            rows.append(
                {
                    "batch": batch_id,
                    "root": info.root,
                    "leaf_count": info.leaf_count,
                    "anchored_at": info.anchored_at,
                    "block": info.block_number,
                    "tx": event.tx_hash,
                }
            )
        head = (
            f"broker {broker}: {len(events)} anchored batch{'es' if len(events) != 1 else ''}"
            f" (latest batch id {latest})"
        )
        lines = [head + (f", {len(rows)} most recent first:" if rows else "")]
        if rows:
            lines.append(f"  {'batch':>7}  {'root':<66}  {'leaves':>6}  {'anchored at':<23}  block")
        lines += [
            f"  {r['batch']:>7}  0x{r['root'].hex()}  {r['leaf_count']:>6}"
            f"  {format_time(r['anchored_at'])}  {r['block']}"
            for r in rows
        ]
        data = {"broker": broker, "latest_batch_id": latest, "total": len(events), "batches": rows}
        return data, lines

    return run_chain_command(args, body, signing=False)


# --- verify --------------------------------------------------------------------------------


def _hex32(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise ConfigError(f"{what}: expected 0x and 64 hex digits, got {value!r}")
    return parse_bytes32(value, what)


def _uint(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{what}: expected a whole number, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{what}: expected a whole number, got {value!r}") from None
    if number < 0:
        raise ConfigError(f"{what}: must not be negative, got {value!r}")
    return number


def _proof_from(item: dict[str, Any], where: str, broker: str | None) -> dict[str, Any]:
    """One proof to check from a JSON object of the forms in ``_PROOF_FILE_HELP``."""
    for name in ("batch", "leaf", "proof"):
        if name not in item:
            raise ConfigError(f"{where}: no {name!r} field (see `blendsm anchors verify -h`)")
    siblings = item["proof"]
    if not isinstance(siblings, list):
        raise ConfigError(f"{where}: proof must be a list of 0x hashes")
    named = item.get("broker")
    if broker is None:
        if named is None:
            raise ConfigError(f"{where}: names no broker; give --broker OPERATOR")
        broker = parse_address(str(named), f"{where}: broker")
    return {
        "broker": broker,
        "batch": _uint(item["batch"], f"{where}: batch"),
        "leaf": _hex32(item["leaf"], f"{where}: leaf"),
        "proof": [_hex32(p, f"{where}: proof item {i}") for i, p in enumerate(siblings)],
        "claimed_root": None
        if item.get("root") is None
        else _hex32(item["root"], f"{where}: root"),
        "context": {k: item[k] for k in ("topic", "device", "sequence", "index") if k in item},
    }


def _read_proof_file(path: Path, broker: str | None) -> list[dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--proof-file: cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"--proof-file: {path} is not UTF-8 text") from None
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict):
        return [_proof_from(whole, str(path), broker)]
    # A record file: the SDK's own reader, so whatever `blendsm verify` reads, this reads.
    from blendsm.device_sdk import read_record

    proofs = []
    try:
        for number, item in read_record(path):
            if item.get("type", "proof") == "proof":
                proofs.append(_proof_from(item, f"{path}:{number}", broker))
    except WireError as exc:  # a line that is not a JSON object
        raise ConfigError(str(exc)) from None
    if not proofs:
        raise ConfigError(f"--proof-file: {path} holds no proof")
    return proofs


def _proofs_from_args(args: argparse.Namespace) -> list[dict[str, Any]]:
    broker = None if args.broker is None else parse_address(args.broker, "--broker")
    inline = args.batch is not None or args.leaf is not None or args.proof is not None
    if args.proof_file is not None:
        if inline:
            raise ConfigError("give either --proof-file or --batch/--leaf/--proof, not both")
        return _read_proof_file(args.proof_file, broker)
    if broker is None or args.batch is None or args.leaf is None:
        raise ConfigError("give --broker, --batch, --leaf and --proof, or --proof-file FILE")
    items = [p.strip() for p in (args.proof or "").split(",") if p.strip()]
    return [
        _proof_from(
            {"batch": args.batch, "leaf": args.leaf, "proof": items},
            "command line",
            broker,
        )
    ]


async def _check(mp: Marketplace, proof: dict[str, Any]) -> dict[str, Any]:
    from blendsm.device_sdk import process_proof

    broker, batch_id, leaf = proof["broker"], proof["batch"], proof["leaf"]
    siblings: list[bytes] = proof["proof"]
    anchor = await mp.anchors.anchor_of(broker, batch_id)
    computed = process_proof(leaf, siblings)
    on_chain = await mp.anchors.verify(broker, batch_id, leaf, siblings)
    anchored = None if anchor is None else anchor.root
    off_chain = anchored is not None and computed == anchored
    notes: list[str] = []
    if anchored is None:
        notes.append(f"broker {broker} never anchored a batch {batch_id}")
    elif not off_chain:
        notes.append(
            f"the proof leads to 0x{computed.hex()}, not the anchored root 0x{anchored.hex()}"
        )
    if on_chain != off_chain:
        notes.append(
            f"DataAnchors.verify says {str(on_chain).lower()} but the recomputed root"
            f" says {str(off_chain).lower()}"
        )
    claimed = proof["claimed_root"]
    if claimed is not None and anchored is not None and claimed != anchored:
        notes.append(f"the root given with the proof, 0x{claimed.hex()}, is not the anchored one")
    return {
        "ok": on_chain and off_chain,
        "broker": broker,
        "batch": batch_id,
        "leaf": leaf,
        "proof": siblings,
        "anchored_root": anchored,
        "computed_root": computed,
        "chain_verify": on_chain,
        "recomputed_ok": off_chain,
        "leaf_count": None if anchor is None else anchor.leaf_count,
        "anchored_at": None if anchor is None else anchor.anchored_at,
        "detail": "; ".join(notes),
        **proof["context"],
    }


def _verdict_line(r: dict[str, Any]) -> str:
    what = f"batch {r['batch']} of {r['broker']}: leaf 0x{r['leaf'].hex()}"
    if "topic" in r:
        what += f" ({r['topic']} seq {r.get('sequence')} from {r.get('device')})"
    if r["ok"]:
        return (
            f"OK    {what} is in the anchored root 0x{r['anchored_root'].hex()}"
            f" ({r['leaf_count']} leaves, {format_time(r['anchored_at'])});"
            " DataAnchors.verify: true, recomputed root: matches"
        )
    return f"FAIL  {what}: {r['detail']}"


def _cmd_verify(args: argparse.Namespace) -> int:
    proofs = _proofs_from_args(args)

    async def run() -> list[dict[str, Any]]:
        async with open_marketplace(args, signing=False) as mp:
            return [await _check(mp, proof) for proof in proofs]

    results = run_async(run)
    failed = sum(1 for r in results if not r["ok"])
    lines = [_verdict_line(r) for r in results]
    if len(results) > 1:
        lines.append(f"{len(results)} proofs: {len(results) - failed} hold, {failed} do not")
    emit(
        args,
        {"ok": not failed, "checked": len(results), "failed": failed, "proofs": results},
        lines,
    )
    return 1 if failed else 0

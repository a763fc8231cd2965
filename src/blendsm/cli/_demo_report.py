"""The last stage of ``blendsm demo``: the figures of the run, read back from the chain, the
broker and the SDK, and the money and integrity invariants checked against each other.

Every figure comes from the party that owns it (the chain's claim events and channel state,
the broker's meter, each Subscriber's own count), so an invariant that holds says that
independent books agree, not that one book agrees with itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from blendsm.cli._demo_parts import BUYERS, DEPOSIT, DEVICES, PRICES
from blendsm.cli._demo_stages import Closed, DemoMarket, Settled
from blendsm.device_sdk import IntegrityKind

__all__ = ["DemoReport", "build_report", "format_summary"]


@dataclass
class DemoReport:
    """Figures of one demo run (amounts in wei, as integers) and the invariants broken."""

    figures: dict[str, Any]
    channels: list[dict[str, Any]]
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            **self.figures,
            "amount_unit": "wei (integers)",
            "channels": self.channels,
            "invariants_hold": self.ok,
            "problems": self.problems,
        }


@dataclass
class _Claims:
    """The demo channels' ChannelClaimed events, summed per buyer."""

    payouts: dict[str, int]
    """What the seller received (payout minus the operator's fee)."""
    fees: dict[str, int]
    count: int


async def build_report(
    market: DemoMarket, settled: Settled, closed: Closed, *, duration: float, started: float
) -> DemoReport:
    """The report of the run that began at ``started`` (``time.monotonic()``)."""
    chain = market.chain
    claims = await _claims(market)
    gas = await _gas_after_deployment(market)
    anchors = await chain.reader.anchors.latest_batch_id(chain.addr["operator"])
    per_channel, problems = await _channel_rows(market, claims, closed)
    service, tallies, subs = market.service, market.tallies, market.subs

    def events(kind: IntegrityKind) -> int:
        return sum(t.events.get(str(kind), 0) for t in tallies.values())

    verified_proofs = events(IntegrityKind.PROOF_VERIFIED)
    failed_proofs = events(IntegrityKind.PROOF_FAILED)
    unavailable_proofs = events(IntegrityKind.PROOF_UNAVAILABLE)
    pending_proofs = sum(s.pending_proofs() for s in subs.values())
    signature_failures = (
        events(IntegrityKind.BAD_SIGNATURE)
        + events(IntegrityKind.UNKNOWN_DEVICE)
        + events(IntegrityKind.BAD_ENVELOPE)
        + sum(t.unverified for t in tallies.values())
        + sum(s.unpaid_invalid for s in closed.stats.values())
    )
    delivered_total = sum(sum(t.paid.values()) for t in tallies.values())
    undecrypted = sum(t.undecrypted for t in tallies.values())
    if delivered_total == 0:
        problems.append("no paid message was delivered")
    if delivered_total != service.meter.delivered:
        problems.append(
            f"subscribers counted {delivered_total} paid deliveries,"
            f" the broker metered {service.meter.delivered}"
        )
    if signature_failures:
        problems.append(f"{signature_failures} signature or device check failures")
    if failed_proofs or unavailable_proofs or pending_proofs:
        problems.append(
            f"sampled proofs not all verified: {failed_proofs} failed,"
            f" {unavailable_proofs} unavailable, {pending_proofs} still pending"
        )
    if verified_proofs == 0:
        problems.append("no sampled proof was verified")
    if anchors == 0:
        problems.append("nothing was anchored on chain")
    if undecrypted:
        problems.append(f"{undecrypted} encrypted messages could not be decrypted")
    if settled.claim_failures:
        problems.append(f"claims not confirmed: {settled.claim_failures}")

    figures: dict[str, Any] = {
        "duration_seconds": duration,
        "elapsed_seconds": round(time.monotonic() - started, 2),
        "devices": len(DEVICES),
        "buyers": len(BUYERS),
        "topics": len(PRICES),
        "encrypted_topics": 1,
        "messages_published": sum(market.published.values()),
        "messages_delivered": service.meter.delivered,
        "messages_verified": sum(t.verified for t in tallies.values()),
        "messages_decrypted": sum(t.decrypted for t in tallies.values()),
        "vouchers_accepted": service.stats.vouchers_accepted,
        "amount_vouchered": sum(closed.vouchered.values()),
        "amount_settled_onchain": sum(r["settled_onchain"] for r in per_channel),
        "paid_to_seller": sum(claims.payouts.values()),
        "fees_to_operator": sum(claims.fees.values()),
        "refunded_to_buyers": sum(closed.refunds.values()),
        "deposits": DEPOSIT * len(BUYERS),
        "claims": claims.count,
        "anchors": anchors,
        "proofs_verified": verified_proofs,
        "proofs_failed": failed_proofs,
        "signature_failures": signature_failures,
        "integrity_events": {
            k: sum(t.events.get(k, 0) for t in tallies.values())
            for k in sorted({k for t in tallies.values() for k in t.events})
        },
        "ratings": settled.ratings,
        "seller_rating_x100": settled.seller_rating_x100,
        "gas_used": gas,
        "dropped_for_credit": service.meter.denied_no_credit,
        "deliveries_denied": service.stats.deliveries_denied,
        "envelopes_refused": service.stats.envelopes_refused,
        "chain_reads_from_sdk_threads": market.reader.calls,
    }
    return DemoReport(figures, per_channel, problems)


async def _claims(market: DemoMarket) -> _Claims:
    chain = market.chain
    claimed_logs = await chain.reader.channels.contract.events.ChannelClaimed().get_logs(
        from_block=chain.deployment.block
    )
    payouts = dict.fromkeys(BUYERS, 0)
    fees = dict.fromkeys(BUYERS, 0)
    by_id = {market.channels[b]: b for b in BUYERS}
    count = 0
    for event in claimed_logs:
        who = by_id.get(bytes(event["args"]["channelId"]))
        if who is not None:
            count += 1
            fees[who] += int(event["args"]["fee"])
            payouts[who] += int(event["args"]["payout"]) - int(event["args"]["fee"])
    return _Claims(payouts, fees, count)


async def _gas_after_deployment(market: DemoMarket) -> int:
    """Gas used by every block after the deployment's: what the marketplace itself cost."""
    w3, first = market.chain.w3, market.chain.deployment.block + 1
    head = int(await w3.eth.block_number)
    gas = 0
    for number in range(first, head + 1):
        gas += int((await w3.eth.get_block(number))["gasUsed"])
    return gas


async def _channel_rows(
    market: DemoMarket, claims: _Claims, closed: Closed
) -> tuple[list[dict[str, Any]], list[str]]:
    """A row per channel, and the money invariants of each: delivered x price == vouchered
    == charged == claimed; payout + fee == claimed; payout + fee + refund == deposit."""
    addr, meter = market.chain.addr, market.service.meter
    problems: list[str] = []
    rows: list[dict[str, Any]] = []
    for buyer in BUYERS:
        ch = market.channels[buyer]
        account = meter.accounts.get(ch)
        tally = market.tallies[buyer]
        info = await market.chain.reader.channels.channel(ch)
        vouchered, refund = closed.vouchered[buyer], closed.refunds[buyer]
        payout, fee = claims.payouts[buyer], claims.fees[buyer]
        paid_messages = closed.stats[buyer].paid_messages
        delivered_value = sum(PRICES[t] * n for t, n in tally.paid.items())
        delivered_n = sum(tally.paid.values())
        charged = account.charged if account is not None else -1
        broker_delivered = account.delivered if account is not None else -1
        claimed = info.claimed if info is not None else -1
        rows.append(
            {
                "buyer": addr[buyer],
                "channel": "0x" + ch.hex(),
                "delivered": delivered_n,
                "delivered_value": delivered_value,
                "vouchered": vouchered,
                "charged": charged,
                "settled_onchain": claimed,
                "payout_to_seller": payout,
                "fee_to_operator": fee,
                "refund": refund,
                "deposit": DEPOSIT,
            }
        )
        name = f"channel of {buyer}"
        if not delivered_value == vouchered == charged == claimed:
            problems.append(
                f"{name}: delivered x price {delivered_value}, vouchered {vouchered},"
                f" charged {charged}, settled on chain {claimed} differ"
            )
        if broker_delivered != delivered_n or paid_messages != delivered_n:
            problems.append(
                f"{name}: broker delivered {broker_delivered}, subscriber paid for"
                f" {paid_messages}, counted {delivered_n}"
            )
        if payout + fee != claimed:
            problems.append(f"{name}: payout + fee {payout + fee} != claimed")
        if payout + fee + refund != DEPOSIT:
            problems.append(
                f"{name}: payout {payout} + fee {fee} + refund {refund} != deposit {DEPOSIT}"
            )
        if info is None or not info.settled:
            problems.append(f"{name}: not settled on chain")
    return rows, problems


def format_summary(report: DemoReport) -> str:
    """The human summary of a run."""
    f = report.figures
    lines = [
        "",
        "BlendSM demo summary (embedded chain, TEST-ONLY accounts; amounts in wei)",
        f"  devices {f['devices']}, buyers {f['buyers']}, paid topics {f['topics']}"
        f" ({f['encrypted_topics']} end-to-end encrypted), streamed {f['duration_seconds']:g} s",
        f"  messages   published {f['messages_published']}, delivered {f['messages_delivered']},"
        f" signature+device verified {f['messages_verified']}, decrypted {f['messages_decrypted']},"
        f" held back for credit (never charged) {f['dropped_for_credit']}",
        f"  payments   {f['vouchers_accepted']} vouchers accepted, vouchered"
        f" {f['amount_vouchered']}, settled on chain {f['amount_settled_onchain']}"
        f" in {f['claims']} claims",
        f"  money      deposits {f['deposits']} = to seller {f['paid_to_seller']} + operator fees"
        f" {f['fees_to_operator']} + refunds {f['refunded_to_buyers']}",
        f"  integrity  {f['anchors']} anchors on chain, {f['proofs_verified']} sampled proofs"
        f" verified, {f['proofs_failed']} failed, {f['signature_failures']} signature failures",
        f"  ratings    {f['ratings']} (seller average {f['seller_rating_x100'] / 100:.2f}),"
        f" gas used after deployment {f['gas_used']}, elapsed {f['elapsed_seconds']:g} s",
    ]
    for row in report.channels:
        lines.append(
            f"  channel {row['channel'][:10]}..  delivered {row['delivered']}"
            f"  x price = {row['delivered_value']} = vouchered {row['vouchered']}"
            f" = settled {row['settled_onchain']}; refund {row['refund']}"
        )
    if report.ok:
        lines.append(
            "All invariants hold: delivered x price == vouchered == settled on chain per"
            " channel; payouts + fees + refunds == deposits; no signature failures; every"
            " sampled proof verified."
        )
    else:
        lines.append("INVARIANTS BROKEN:")
        lines.extend(f"  - {p}" for p in report.problems)
    return "\n".join(lines)

"""The last stage of ``blendsm demo --brokers N``: the figures of the run and its invariants,
per channel, per operator and in total (each figure from the party that owns it: the chain's
channel state and claim events, each buyer's FailoverSubscriber and its members)."""

from __future__ import annotations

import time
from typing import Any

from blendsm.cli._demo_many_parts import (
    BUYERS,
    CREDIT,
    DEPOSIT,
    FAILOVER_BOUND,
    OPERATORS,
    TOPICS,
    ManyRun,
    Timeline,
    lost,
)
from blendsm.cli._demo_report import DemoReport

__all__ = ["format_many_summary", "many_report"]


def many_report(
    run: ManyRun, timeline: Timeline, rows: list[dict[str, Any]], *, duration: float, started: float
) -> DemoReport:
    problems: list[str] = []
    missing = {b: lost(run, b) for b in BUYERS}
    gaps = {b: len(run.tapes[b].gaps) for b in BUYERS}
    unverified = sum(t.unverified for t in run.tapes.values())
    slowest = max(timeline.moved.values(), default=None)
    if not timeline.moved:
        problems.append(f"no buyer moved off the killed broker {timeline.killed}")
    elif slowest is not None and slowest > FAILOVER_BOUND:
        problems.append(f"a buyer took {slowest} s to resume (bound {FAILOVER_BOUND} s)")
    if run.owed_after_settle_up:
        problems.append(f"{run.owed_after_settle_up} brokers never confirmed a buyer's voucher")
    if any(missing.values()):
        problems.append(f"sequences lost after de-duplication: {missing}")
    if unverified:
        problems.append(f"{unverified} messages not verified (signature or device)")
    if timeline.rejoined_seconds is None:
        problems.append(f"broker {timeline.killed} did not catch up after its restart")
    bound = CREDIT * max(TOPICS.values())
    for row in rows:
        name = f"channel of {row['buyer']} with operator {row['operator']}"
        received, vouchered, settled = (
            row["received_value"],
            row["vouchered"],
            row["settled_onchain"],
        )
        # The killed broker never claims deliveries whose count died with it (it cannot show
        # them; the buyer keeps that money): at most what it had not yet written, within the
        # credit. Every other channel: equal.
        slack = bound if row["on_killed_broker"] else 0
        if not (received == vouchered and 0 <= vouchered - settled <= slack):
            problems.append(
                f"{name}: received {received}, vouchered {vouchered}, settled on chain"
                f" {settled} (allowed shortfall {slack})"
            )
        if row["payout_to_seller"] + row["fee_to_operator"] != row["settled_onchain"]:
            problems.append(f"{name}: payout + fee != settled on chain")
        if row["payout_to_seller"] + row["fee_to_operator"] + row["refund"] != DEPOSIT:
            problems.append(f"{name}: payout + fee + refund != deposit")
    per_operator = {}
    for letter in "AB":
        mine = [r for r in rows if r["operator"] == letter]
        per_operator[letter] = {
            k: sum(r[k] for r in mine)
            for k in ("received_value", "vouchered", "settled_onchain", "fee_to_operator")
        }
    if sum(r["settled_onchain"] for r in rows) == 0:
        problems.append("nothing was settled on chain")
    figures: dict[str, Any] = {
        "brokers": [
            {"name": b.name, "operator": "AB"[OPERATORS.index(b.operator)], "starts": b.starts}
            for b in run.brokers
        ],
        "duration_seconds": duration,
        "elapsed_seconds": round(time.monotonic() - started, 2),
        "killed_broker": timeline.killed,
        "failover_seconds": timeline.moved,
        "failover_seconds_max": slowest,
        "rejoined_seconds": timeline.rejoined_seconds,
        "messages_published": sum(len(s) for s in run.published.values()),
        "delivered_per_broker": {b: dict(sorted(run.tapes[b].by_broker.items())) for b in BUYERS},
        "lost_after_dedup": missing,
        "gaps_reported": gaps,
        "duplicates_dropped": {b: run.subs[b].stats.duplicates_dropped for b in BUYERS},
        "replayed": {b: run.subs[b].stats.replayed for b in BUYERS},
        "per_operator": per_operator,
        "amount_settled_onchain": sum(r["settled_onchain"] for r in rows),
        "uncounted_at_kill": sum(r["vouchered"] - r["settled_onchain"] for r in rows),
        "uncounted_bound_per_channel": bound,
        "owed_after_settle_up": run.owed_after_settle_up,
        "paid_to_seller": sum(r["payout_to_seller"] for r in rows),
        "fees_to_operators": sum(r["fee_to_operator"] for r in rows),
        "refunded_to_buyers": sum(r["refund"] for r in rows),
        "deposits": DEPOSIT * len(rows),
    }
    return DemoReport(figures, rows, problems)


def format_many_summary(report: DemoReport) -> str:
    """The human summary of a many-broker run."""
    f = report.figures
    brokers = ", ".join(f"{b['name']} (operator {b['operator']})" for b in f["brokers"])
    moved = ", ".join(f"{b} {s:.2f} s" for b, s in f["failover_seconds"].items()) or "none"
    lines = [
        f"blendsm demo --brokers {len(f['brokers'])}: {brokers}",
        f"  killed {f['killed_broker']} mid-stream; buyers resumed elsewhere: {moved}"
        f" (bound {FAILOVER_BOUND:g} s); restarted, caught up in {f['rejoined_seconds']} s",
        f"  {f['messages_published']} readings published; lost after de-duplication:"
        f" {sum(f['lost_after_dedup'].values())}; gaps reported: {sum(f['gaps_reported'].values())}",
    ]
    for letter, money in f["per_operator"].items():
        lines.append(
            f"  operator {letter}: received {money['received_value']}, vouchered"
            f" {money['vouchered']}, settled {money['settled_onchain']} wei"
            f" (fees {money['fee_to_operator']})"
        )
    lines.append(
        f"  not claimable after the kill: {f['uncounted_at_kill']} wei (deliveries whose count"
        " died with the killed broker; the buyers keep it)"
    )
    lines.append(
        f"  total: payouts {f['paid_to_seller']} + fees {f['fees_to_operators']} + refunds"
        f" {f['refunded_to_buyers']} = deposits {f['deposits']}"
        f" -> {'invariants hold' if report.ok else 'INVARIANTS BROKEN'}"
    )
    return "\n".join(lines)

"""Edge signing throughput on one core: EnvelopeSigner (coincurve) vs eth_account.

Run as ``python benchmarks/bench_signing.py`` (about 15 s). Pins itself to one CPU where
the OS allows it, cycles through 256 distinct messages, reports the median of several timed
rounds, and prints the envelope overhead in bytes for 64 B and 1 KB payloads.
"""

from __future__ import annotations

import time

from eth_account import Account
from eth_account.messages import encode_typed_data
from harness import CHAIN_ID, CONTRACT, KEY, POOL, measure, print_header, row

from blendsm.device_sdk import (
    ENVELOPE_HEADER_SIZE,
    EnvelopeSigner,
    MessageDomain,
    decode_envelope,
    message_typed_data,
    verify_envelope,
)

TOPIC = "market/acme/temp/device-17"


def main() -> None:
    print_header("bench_signing")
    domain = MessageDomain(CHAIN_ID, CONTRACT)
    signer = EnvelopeSigner(KEY, domain)
    now = int(time.time() * 1000)
    payloads = [b"%064d" % i for i in range(POOL)]  # 64-byte readings
    typed = [
        message_typed_data(domain, TOPIC, signer.address, i + 1, now + i, payloads[i])
        for i in range(POOL)
    ]
    envelopes = [signer.sign(TOPIC, payloads[i], i + 1, now + i) for i in range(POOL)]
    wire = [e.encode() for e in envelopes]
    signatures = [e.signature for e in envelopes]
    # Same bytes signed both ways: the EIP-712 encodings agree.
    theirs = Account.sign_message(encode_typed_data(full_message=typed[0]), KEY)
    assert theirs.signature == signatures[0]

    print("\nsign one 64-byte message (EIP-712 Message struct)")
    base = measure(lambda i: Account.sign_message(encode_typed_data(full_message=typed[i]), KEY))
    ours = measure(lambda i: signer.sign(TOPIC, payloads[i], i + 1, now + i).encode())
    row("eth_account sign_message(encode_typed_data(...))", base)
    row("ours: EnvelopeSigner.sign(...).encode()", ours, base)
    print(f"  signing speed-up: {ours / base:.1f}x")

    print("\nverify one 64-byte message")
    vbase = measure(
        lambda i: Account.recover_message(
            encode_typed_data(full_message=typed[i]), signature=signatures[i]
        )
    )
    vours = measure(lambda i: verify_envelope(domain, TOPIC, decode_envelope(wire[i])))
    row("eth_account recover_message(encode_typed_data(...))", vbase)
    row("ours: verify_envelope(decode_envelope(wire))", vours, vbase)
    print(f"  verify speed-up: {vours / vbase:.1f}x")

    print("\nenvelope overhead (binary header, payload as is)")
    for size in (64, 1024):
        encoded = signer.sign(TOPIC, bytes(size), 1, now).encode()
        extra = len(encoded) - size
        assert extra == ENVELOPE_HEADER_SIZE
        print(
            f"  {size:>5} B payload -> {len(encoded):>5} B on the wire: +{extra} B ({extra / size:.1%})"
        )


if __name__ == "__main__":
    main()

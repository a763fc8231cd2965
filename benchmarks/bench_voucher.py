"""Voucher throughput on one core: our path vs eth_account's.

Run as ``python benchmarks/bench_voucher.py`` (about 20 s). The process pins itself to
one CPU where the OS allows it, cycles through 256 distinct vouchers so nothing is
accidentally warm, and reports the median of several timed rounds.
"""

from __future__ import annotations

from eth_account import Account
from eth_account.messages import SignableMessage, encode_typed_data
from harness import CHAIN_ID, CONTRACT, KEY, POOL, measure, print_header, row

from blendsm.device_sdk import (
    ChannelState,
    VoucherDomain,
    VoucherSigner,
    VoucherVerifier,
    keccak256_backends,
    recover_voucher_signer,
    sign_voucher,
    voucher_typed_data,
)


def main() -> None:
    print_header("bench_voucher")

    domain = VoucherDomain(CHAIN_ID, CONTRACT)
    signer = VoucherSigner(KEY, domain)
    verifier = VoucherVerifier(domain)
    channel = ChannelState(signer.address, deposit=10**30, claimed=0)
    amounts = [10**18 + i for i in range(POOL)]
    channel_ids = [i.to_bytes(32, "big") for i in range(POOL)]
    lane = signer.address  # any address: the broker key the vouchers name
    vouchers = [signer.sign(c, lane, a) for c, a in zip(channel_ids, amounts, strict=True)]
    messages = [
        voucher_typed_data(domain, c, lane, a) for c, a in zip(channel_ids, amounts, strict=True)
    ]
    encoded: list[SignableMessage] = [encode_typed_data(full_message=m) for m in messages]
    signatures = [v.signature for v in vouchers]
    assert Account.recover_message(encoded[0], signature=signatures[0]) == signer.address

    print("\nkeccak-256 of 64 bytes")
    data = bytes(range(64))
    for name, fn in keccak256_backends().items():
        row(name, measure(lambda _i, fn=fn: fn(data)))  # type: ignore[misc]

    print("\nverify (recover the signer of an EIP-712 voucher)")
    ours = measure(lambda i: verifier.verify(vouchers[i], channel, 0))
    ours_recover = measure(lambda i: recover_voucher_signer(domain, vouchers[i]))
    theirs_full = measure(
        lambda i: Account.recover_message(
            encode_typed_data(full_message=messages[i]), signature=signatures[i]
        )
    )
    theirs_pre = measure(lambda i: Account.recover_message(encoded[i], signature=signatures[i]))
    row("(b) eth_account encode_typed_data + recover_message", theirs_full)
    row("(c) eth_account recover_message, pre-encoded", theirs_pre, theirs_full)
    row("    ours: recover_voucher_signer (checksum address)", ours_recover, theirs_full)
    row("(a) ours: VoucherVerifier.verify (full claim rules)", ours, theirs_full)
    print(f"  verify speed-up: {ours / theirs_full:.1f}x vs (b), {ours / theirs_pre:.1f}x vs (c)")

    print("\nsign")
    theirs_sign = measure(lambda i: Account.sign_typed_data(KEY, full_message=messages[i]))
    ours_oneoff = measure(lambda i: sign_voucher(KEY, domain, channel_ids[i], lane, amounts[i]))
    ours_sign = measure(lambda i: signer.sign(channel_ids[i], lane, amounts[i]))
    row("eth_account Account.sign_typed_data", theirs_sign)
    row("ours: sign_voucher (one-off, key set up per call)", ours_oneoff, theirs_sign)
    row("ours: VoucherSigner.sign (key set up once)", ours_sign, theirs_sign)


if __name__ == "__main__":
    main()

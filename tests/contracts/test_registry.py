"""Registry: membership life cycle, oracle roles (AccessControl) and device ownership.

Every test runs on the embedded chain and on anvil.
"""

from __future__ import annotations

import pytest
from eth_utils import keccak

from blendsm.contracts import Role, Status

pytestmark = pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)

ZERO = "0x" + "00" * 20
ORACLE_ROLE = keccak(text="ORACLE_ROLE")
DEFAULT_ADMIN_ROLE = bytes(32)


ROLES = [Role.SELLER, Role.BUYER, Role.OPERATOR, Role.VALIDATOR]


def participant(chain, label):
    return tuple(chain.Registry.functions.participant(chain.addr(label)).call())


def active_roles(chain, label):
    fns = chain.Registry.functions
    return {r for r in Role if fns.hasActiveRole(chain.addr(label), r).call()}


# ---------------------------------------------------------------- roles and deployment


def test_constructor_grants_admin_and_oracle_roles(chain, reg):
    oracle = chain.addr("oracle")
    assert reg.ORACLE_ROLE().call() == ORACLE_ROLE
    assert reg.DEFAULT_ADMIN_ROLE().call() == DEFAULT_ADMIN_ROLE
    assert reg.hasRole(ORACLE_ROLE, oracle).call()
    assert reg.hasRole(DEFAULT_ADMIN_ROLE, oracle).call()
    assert reg.getRoleAdmin(ORACLE_ROLE).call() == DEFAULT_ADMIN_ROLE
    assert reg.getRoleAdmin(DEFAULT_ADMIN_ROLE).call() == DEFAULT_ADMIN_ROLE
    for label in ("seller", "buyer", "stranger"):
        assert not reg.hasRole(ORACLE_ROLE, chain.addr(label)).call()
        assert not reg.hasRole(DEFAULT_ADMIN_ROLE, chain.addr(label)).call()
    # The constructor's grants are on the log (RoleAdminChanged is in the ABI, inherited,
    # but no Registry code path ever changes a role admin).
    granted = chain.Registry.events.RoleGranted().get_logs(from_block=0)
    assert [
        (bytes(e["args"]["role"]), e["args"]["account"], e["args"]["sender"]) for e in granted
    ] == [
        (DEFAULT_ADMIN_ROLE, oracle, oracle),
        (ORACLE_ROLE, oracle, oracle),
    ]
    assert chain.Registry.events.RoleAdminChanged().get_logs(from_block=0) == []


def test_supports_interface(reg):
    assert reg.supportsInterface(bytes.fromhex("01ffc9a7")).call()  # IERC165
    assert reg.supportsInterface(bytes.fromhex("7965db0b")).call()  # IAccessControl
    assert not reg.supportsInterface(bytes.fromhex("ffffffff")).call()
    assert not reg.supportsInterface(bytes.fromhex("12345678")).call()


def test_unknown_account_has_no_role_or_status(chain, reg):
    stranger = chain.addr("stranger")
    assert participant(chain, "stranger") == (Role.NONE, Status.NONE)
    assert not reg.isActive(stranger).call()
    assert active_roles(chain, "stranger") == set()


# ---------------------------------------------------------------- apply / approve / reject


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.name.lower())
def test_apply_then_approve(chain, reg, tx, events, role):
    seller = chain.addr("seller")
    receipt = tx(reg.applyForRole(role), "seller")
    assert events(receipt) == [("Registry.Applied", {"account": seller, "role": role})]
    assert participant(chain, "seller") == (role, Status.PENDING)
    assert not reg.isActive(seller).call()
    assert active_roles(chain, "seller") == set()

    receipt = tx(reg.approve(seller), "oracle")
    assert events(receipt) == [
        ("Registry.Approved", {"account": seller, "role": role, "oracle": chain.addr("oracle")})
    ]
    assert participant(chain, "seller") == (role, Status.ACTIVE)
    assert reg.isActive(seller).call()
    assert active_roles(chain, "seller") == {role}


def test_apply_role_none_and_out_of_range(chain, reg, reverts):
    with reverts("RegistryInvalidRole"):
        reg.applyForRole(Role.NONE).transact({"from": chain.addr("stranger")})
    with reverts(""):  # the ABI decoder refuses an out-of-range enum, without data
        reg.applyForRole(5).transact({"from": chain.addr("stranger")})
    assert participant(chain, "stranger") == (Role.NONE, Status.NONE)


def test_reject(chain, reg, tx, events):
    buyer = chain.addr("buyer")
    tx(reg.applyForRole(Role.BUYER), "buyer")
    receipt = tx(reg.reject(buyer), "oracle")
    assert events(receipt) == [
        ("Registry.Rejected", {"account": buyer, "oracle": chain.addr("oracle")})
    ]
    assert participant(chain, "buyer") == (Role.BUYER, Status.REJECTED)
    assert not reg.isActive(buyer).call()
    assert active_roles(chain, "buyer") == set()


def test_rejected_may_apply_again_with_another_role(chain, reg, tx, events):
    buyer = chain.addr("buyer")
    tx(reg.applyForRole(Role.BUYER), "buyer")
    tx(reg.reject(buyer), "oracle")
    receipt = tx(reg.applyForRole(Role.SELLER), "buyer")
    assert events(receipt) == [("Registry.Applied", {"account": buyer, "role": Role.SELLER})]
    assert participant(chain, "buyer") == (Role.SELLER, Status.PENDING)
    tx(reg.approve(buyer), "oracle")
    assert active_roles(chain, "buyer") == {Role.SELLER}


def test_cannot_apply_while_pending_or_active(chain, reg, tx, reverts):
    seller = chain.addr("seller")
    tx(reg.applyForRole(Role.SELLER), "seller")
    with reverts("RegistryCannotApply", seller, Status.PENDING):
        reg.applyForRole(Role.BUYER).transact({"from": seller})
    tx(reg.approve(seller), "oracle")
    with reverts("RegistryCannotApply", seller, Status.ACTIVE):
        reg.applyForRole(Role.SELLER).transact({"from": seller})
    assert participant(chain, "seller") == (Role.SELLER, Status.ACTIVE)


def test_revoke_is_final(chain, reg, tx, events, enrol, reverts):
    seller = enrol("seller", Role.SELLER)
    receipt = tx(reg.revoke(seller), "oracle")
    assert events(receipt) == [
        ("Registry.Revoked", {"account": seller, "oracle": chain.addr("oracle")})
    ]
    assert participant(chain, "seller") == (Role.SELLER, Status.REVOKED)
    assert not reg.isActive(seller).call()
    assert active_roles(chain, "seller") == set()
    for role in ROLES:
        with reverts("RegistryCannotApply", seller, Status.REVOKED):
            reg.applyForRole(role).transact({"from": seller})
    with reverts("RegistryWrongStatus", seller, Status.REVOKED):
        reg.leave().transact({"from": seller})
    for fn in (reg.approve, reg.reject, reg.revoke):
        with reverts("RegistryWrongStatus", seller, Status.REVOKED):
            fn(seller).transact({"from": chain.addr("oracle")})
    assert participant(chain, "seller") == (Role.SELLER, Status.REVOKED)


@pytest.mark.parametrize("start", [Status.ACTIVE, Status.PENDING], ids=["active", "pending"])
def test_leave_and_apply_again(chain, reg, tx, events, start):
    buyer = chain.addr("buyer")
    tx(reg.applyForRole(Role.BUYER), "buyer")
    if start == Status.ACTIVE:
        tx(reg.approve(buyer), "oracle")
    receipt = tx(reg.leave(), "buyer")
    assert events(receipt) == [("Registry.Left", {"account": buyer})]
    assert participant(chain, "buyer") == (Role.BUYER, Status.LEFT)
    assert not reg.isActive(buyer).call()
    assert active_roles(chain, "buyer") == set()

    tx(reg.applyForRole(Role.OPERATOR), "buyer")
    assert participant(chain, "buyer") == (Role.OPERATOR, Status.PENDING)
    assert not reg.isActive(buyer).call()  # a comeback needs a new approval
    tx(reg.approve(buyer), "oracle")
    assert active_roles(chain, "buyer") == {Role.OPERATOR}


def test_leave_needs_active_or_pending(chain, reg, tx, reverts):
    stranger, buyer = chain.addr("stranger"), chain.addr("buyer")
    with reverts("RegistryWrongStatus", stranger, Status.NONE):
        reg.leave().transact({"from": stranger})
    tx(reg.applyForRole(Role.BUYER), "buyer")
    tx(reg.reject(buyer), "oracle")
    with reverts("RegistryWrongStatus", buyer, Status.REJECTED):
        reg.leave().transact({"from": buyer})
    tx(reg.applyForRole(Role.BUYER), "buyer")
    tx(reg.leave(), "buyer")
    with reverts("RegistryWrongStatus", buyer, Status.LEFT):
        reg.leave().transact({"from": buyer})


def test_oracle_actions_need_the_right_status(chain, reg, tx, reverts):
    oracle = {"from": chain.addr("oracle")}
    s = chain.addr("stranger")

    def refused(status, *actions):
        """Each oracle action on ``s`` reverts, naming ``s``'s current status."""
        for fn in actions:
            with reverts("RegistryWrongStatus", s, status):
                fn(s).transact(oracle)

    # None
    refused(Status.NONE, reg.approve, reg.reject, reg.revoke)
    # Pending
    tx(reg.applyForRole(Role.BUYER), "stranger")
    # Active: cannot be approved or rejected again
    tx(reg.approve(s), "oracle")
    refused(Status.ACTIVE, reg.approve, reg.reject)
    # Left: nothing but a ban until a new application
    tx(reg.leave(), "stranger")
    refused(Status.LEFT, reg.approve, reg.reject)
    # Rejected
    tx(reg.applyForRole(Role.BUYER), "stranger")
    tx(reg.reject(s), "oracle")
    refused(Status.REJECTED, reg.approve, reg.reject)
    # Revoked: nothing more, not even a second revocation
    tx(reg.revoke(s), "oracle")
    refused(Status.REVOKED, reg.approve, reg.reject, reg.revoke)


@pytest.mark.parametrize("before", ["pending", "left", "rejected"])
def test_revocation_bans_whatever_the_status(chain, reg, tx, events, reverts, before):
    # Leaving (or being pending/rejected) must not dodge a ban: revoke works and is final.
    s = chain.addr("stranger")
    tx(reg.applyForRole(Role.BUYER), "stranger")
    if before == "left":
        tx(reg.leave(), "stranger")
    elif before == "rejected":
        tx(reg.reject(s), "oracle")
    receipt = tx(reg.revoke(s), "oracle")
    assert events(receipt, "Revoked") == [{"account": s, "oracle": chain.addr("oracle")}]
    assert reg.participant(s).call() == [Role.BUYER, Status.REVOKED]
    with reverts("RegistryCannotApply", s, Status.REVOKED):
        reg.applyForRole(Role.BUYER).transact({"from": s})


@pytest.mark.parametrize("action", ["approve", "reject", "revoke"])
def test_only_oracle_role_can_admit_reject_revoke(chain, reg, tx, enrol, reverts, action):
    buyer = chain.addr("buyer")
    tx(reg.applyForRole(Role.BUYER), "buyer")
    if action == "revoke":
        tx(reg.approve(buyer), "oracle")
    enrol("seller", Role.SELLER)  # an active participant is no oracle either
    # DEFAULT_ADMIN_ROLE alone is not enough: it can grant ORACLE_ROLE, not use it
    tx(reg.grantRole(DEFAULT_ADMIN_ROLE, chain.addr("validator")), "oracle")
    for label in ("stranger", "seller", "buyer", "validator"):
        caller = chain.addr(label)
        with reverts("AccessControlUnauthorizedAccount", caller, ORACLE_ROLE):
            getattr(reg, action)(buyer).transact({"from": caller})
    expected = Status.ACTIVE if action == "revoke" else Status.PENDING
    assert participant(chain, "buyer") == (Role.BUYER, expected)


def test_second_oracle_can_be_granted_used_and_revoked(chain, reg, tx, events, reverts):
    oracle, second = chain.addr("oracle"), chain.addr("validator")
    receipt = tx(reg.grantRole(ORACLE_ROLE, second), "oracle")
    assert events(receipt) == [
        ("Registry.RoleGranted", {"role": ORACLE_ROLE, "account": second, "sender": oracle})
    ]
    assert reg.hasRole(ORACLE_ROLE, second).call()
    assert events(tx(reg.grantRole(ORACLE_ROLE, second), "oracle")) == []  # no-op, no event

    for label in ("seller", "buyer", "operator"):
        tx(reg.applyForRole(Role.SELLER), label)
    receipt = tx(reg.approve(chain.addr("seller")), "validator")
    assert events(receipt, "Approved") == [
        {"account": chain.addr("seller"), "role": Role.SELLER, "oracle": second}
    ]
    receipt = tx(reg.reject(chain.addr("operator")), "validator")
    assert events(receipt, "Rejected") == [{"account": chain.addr("operator"), "oracle": second}]
    receipt = tx(reg.revoke(chain.addr("seller")), "validator")
    assert events(receipt, "Revoked") == [{"account": chain.addr("seller"), "oracle": second}]

    # An oracle is no admin: it cannot grant or revoke roles.
    with reverts("AccessControlUnauthorizedAccount", second, DEFAULT_ADMIN_ROLE):
        reg.grantRole(ORACLE_ROLE, chain.addr("stranger")).transact({"from": second})
    with reverts("AccessControlUnauthorizedAccount", second, DEFAULT_ADMIN_ROLE):
        reg.revokeRole(ORACLE_ROLE, oracle).transact({"from": second})

    receipt = tx(reg.revokeRole(ORACLE_ROLE, second), "oracle")
    assert events(receipt) == [
        ("Registry.RoleRevoked", {"role": ORACLE_ROLE, "account": second, "sender": oracle})
    ]
    assert not reg.hasRole(ORACLE_ROLE, second).call()
    with reverts("AccessControlUnauthorizedAccount", second, ORACLE_ROLE):
        reg.approve(chain.addr("buyer")).transact({"from": second})
    assert events(tx(reg.revokeRole(ORACLE_ROLE, second), "oracle")) == []  # no-op


def test_grant_role_needs_admin(chain, reg, reverts):
    stranger = chain.addr("stranger")
    with reverts("AccessControlUnauthorizedAccount", stranger, DEFAULT_ADMIN_ROLE):
        reg.grantRole(ORACLE_ROLE, stranger).transact({"from": stranger})
    with reverts("AccessControlUnauthorizedAccount", stranger, DEFAULT_ADMIN_ROLE):
        reg.grantRole(DEFAULT_ADMIN_ROLE, stranger).transact({"from": stranger})
    assert not reg.hasRole(ORACLE_ROLE, stranger).call()


def test_renounce_role(chain, reg, tx, events, reverts):
    second = chain.addr("validator")
    tx(reg.grantRole(ORACLE_ROLE, second), "oracle")
    with reverts("AccessControlBadConfirmation"):
        reg.renounceRole(ORACLE_ROLE, chain.addr("oracle")).transact({"from": second})
    receipt = tx(reg.renounceRole(ORACLE_ROLE, second), "validator")
    assert events(receipt) == [
        ("Registry.RoleRevoked", {"role": ORACLE_ROLE, "account": second, "sender": second})
    ]
    assert not reg.hasRole(ORACLE_ROLE, second).call()
    assert reg.hasRole(ORACLE_ROLE, chain.addr("oracle")).call()


# ---------------------------------------------------------------- devices


def test_add_and_remove_devices(chain, reg, tx, events, enrol):
    seller = enrol("seller", Role.SELLER)
    device, device2 = chain.addr("device"), chain.addr("device2")
    assert reg.deviceOwner(device).call() == ZERO
    assert reg.activeSellerOf(device).call() == ZERO
    assert reg.deviceCount(seller).call() == 0

    receipt = tx(reg.addDevice(device), "seller")
    assert events(receipt) == [("Registry.DeviceAdded", {"seller": seller, "device": device})]
    tx(reg.addDevice(device2), "seller")
    assert reg.deviceOwner(device).call() == seller
    assert reg.deviceOwner(device2).call() == seller
    assert reg.activeSellerOf(device).call() == seller
    assert reg.deviceCount(seller).call() == 2

    receipt = tx(reg.removeDevice(device), "seller")
    assert events(receipt) == [("Registry.DeviceRemoved", {"seller": seller, "device": device})]
    assert reg.deviceOwner(device).call() == ZERO
    assert reg.activeSellerOf(device).call() == ZERO
    assert reg.activeSellerOf(device2).call() == seller
    assert reg.deviceCount(seller).call() == 1

    # A released device may join another seller.
    other = enrol("buyer2", Role.SELLER)
    tx(reg.addDevice(device), "buyer2")
    assert reg.activeSellerOf(device).call() == other
    assert reg.deviceCount(other).call() == 1


def test_only_active_sellers_add_devices(chain, reg, tx, enrol, reverts):
    device = chain.addr("device")

    def refused(label):
        with reverts("RegistryNotActiveSeller", chain.addr(label)):
            reg.addDevice(device).transact({"from": chain.addr(label)})

    refused("stranger")  # no status
    tx(reg.applyForRole(Role.SELLER), "seller")
    refused("seller")  # pending
    for role, label in (
        (Role.BUYER, "buyer"),
        (Role.OPERATOR, "operator"),
        (Role.VALIDATOR, "validator"),
    ):
        enrol(label, role)
        refused(label)  # active, wrong role
    tx(reg.reject(chain.addr("seller")), "oracle")
    refused("seller")  # rejected
    enrol("buyer2", Role.SELLER)
    tx(reg.revoke(chain.addr("buyer2")), "oracle")
    refused("buyer2")  # revoked
    tx(reg.applyForRole(Role.SELLER), "seller")
    tx(reg.approve(chain.addr("seller")), "oracle")
    tx(reg.leave(), "seller")
    refused("seller")  # left
    assert reg.deviceOwner(device).call() == ZERO


def test_device_must_be_free(chain, reg, tx, enrol, reverts):
    enrol("seller", Role.SELLER)
    enrol("buyer2", Role.SELLER)
    enrol("buyer", Role.BUYER)
    tx(reg.applyForRole(Role.OPERATOR), "operator")  # pending participant
    tx(reg.applyForRole(Role.VALIDATOR), "validator")
    tx(reg.reject(chain.addr("validator")), "oracle")  # rejected participant
    tx(reg.addDevice(chain.addr("device")), "seller")
    cases = [
        ("seller", ZERO),  # zero address
        ("seller", chain.addr("device")),  # owned by the caller already
        ("buyer2", chain.addr("device")),  # owned by another seller
        ("seller", chain.addr("seller")),  # the seller itself (a participant)
        ("seller", chain.addr("buyer")),  # an active participant
        ("seller", chain.addr("operator")),  # a pending applicant
        ("seller", chain.addr("validator")),  # a rejected applicant
    ]
    for caller, device in cases:
        with reverts("RegistryDeviceUnavailable", device):
            reg.addDevice(device).transact({"from": chain.addr(caller)})
    assert reg.deviceOwner(chain.addr("device")).call() == chain.addr("seller")
    assert reg.deviceCount(chain.addr("seller")).call() == 1
    assert reg.deviceCount(chain.addr("buyer2")).call() == 0


def test_left_participant_cannot_become_a_device(chain, reg, tx, enrol, reverts):
    enrol("seller", Role.SELLER)
    tx(reg.applyForRole(Role.BUYER), "buyer")
    tx(reg.leave(), "buyer")
    with reverts("RegistryDeviceUnavailable", chain.addr("buyer")):
        reg.addDevice(chain.addr("buyer")).transact({"from": chain.addr("seller")})


def test_device_cannot_apply_until_released(chain, reg, tx, enrol, reverts):
    enrol("seller", Role.SELLER)
    device = chain.addr("device")
    tx(reg.addDevice(device), "seller")
    for role in ROLES:
        with reverts("RegistryDeviceUnavailable", device):
            reg.applyForRole(role).transact({"from": device})
    tx(reg.removeDevice(device), "seller")
    tx(reg.applyForRole(Role.BUYER), "device")
    assert participant(chain, "device") == (Role.BUYER, Status.PENDING)


def test_remove_device_by_owner_only(chain, reg, tx, enrol, reverts):
    seller = enrol("seller", Role.SELLER)
    other = enrol("buyer2", Role.SELLER)
    device, device2 = chain.addr("device"), chain.addr("device2")
    tx(reg.addDevice(device), "seller")
    for caller in (other, chain.addr("stranger"), device, chain.addr("oracle")):
        with reverts("RegistryNotDeviceOwner", device, caller):
            reg.removeDevice(device).transact({"from": caller})
    with reverts("RegistryNotDeviceOwner", device2, seller):  # not registered at all
        reg.removeDevice(device2).transact({"from": seller})
    tx(reg.removeDevice(device), "seller")
    with reverts("RegistryNotDeviceOwner", device, seller):  # already removed
        reg.removeDevice(device).transact({"from": seller})
    assert reg.deviceCount(seller).call() == 0


def test_revoked_seller_devices_stop_acting_but_can_be_released(chain, reg, tx, events, enrol):
    seller = enrol("seller", Role.SELLER)
    device, device2 = chain.addr("device"), chain.addr("device2")
    tx(reg.addDevice(device), "seller")
    tx(reg.addDevice(device2), "seller")
    tx(reg.revoke(seller), "oracle")
    assert reg.activeSellerOf(device).call() == ZERO
    assert reg.activeSellerOf(device2).call() == ZERO
    assert reg.deviceOwner(device).call() == seller  # still owned, just inactive
    assert reg.deviceCount(seller).call() == 2
    receipt = tx(reg.removeDevice(device), "seller")
    assert events(receipt) == [("Registry.DeviceRemoved", {"seller": seller, "device": device})]
    assert reg.deviceCount(seller).call() == 1


def test_devices_of_a_seller_who_left_and_came_back(chain, reg, tx, enrol):
    seller = enrol("seller", Role.SELLER)
    device = chain.addr("device")
    tx(reg.addDevice(device), "seller")
    tx(reg.leave(), "seller")
    assert reg.activeSellerOf(device).call() == ZERO
    tx(reg.applyForRole(Role.SELLER), "seller")
    assert reg.activeSellerOf(device).call() == ZERO  # pending
    tx(reg.approve(seller), "oracle")
    assert reg.activeSellerOf(device).call() == seller  # devices are kept across a comeback


def test_devices_stop_acting_when_owner_comes_back_in_another_role(chain, reg, tx, enrol):
    seller = enrol("seller", Role.SELLER)
    device = chain.addr("device")
    tx(reg.addDevice(device), "seller")
    tx(reg.leave(), "seller")
    tx(reg.applyForRole(Role.BUYER), "seller")
    tx(reg.approve(seller), "oracle")
    assert not reg.hasActiveRole(seller, Role.SELLER).call()
    assert reg.activeSellerOf(device).call() == ZERO

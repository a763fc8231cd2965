// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";

/// @title BlendSM Registry: permissioned membership and device ownership.
/// @notice An address applies to join the marketplace with one role; an oracle (an
/// administrator holding ORACLE_ROLE) approves or rejects it, and may later revoke it.
/// A participant may leave. Active sellers register the addresses of their devices;
/// a device belongs to exactly one seller and acts for that seller while the seller is active.
contract Registry is AccessControl {
    /// @notice Role of the administrators who admit, reject and revoke participants.
    bytes32 public constant ORACLE_ROLE = keccak256("ORACLE_ROLE");

    /// @notice What a participant does in the marketplace.
    enum Role {
        None,
        Seller,
        Buyer,
        Operator,
        Validator
    }

    /// @notice Where a participant stands. Revoked is final; Rejected and Left may apply again.
    enum Status {
        None,
        Pending,
        Active,
        Rejected,
        Revoked,
        Left
    }

    struct Participant {
        Role role;
        Status status;
    }

    mapping(address account => Participant) private _participants;
    mapping(address device => address seller) private _deviceOwner;
    mapping(address seller => uint256) private _deviceCount;

    /// @notice An application asked for a role other than None.
    error RegistryInvalidRole();
    /// @notice The account cannot apply now (pending, active or revoked).
    error RegistryCannotApply(address account, Status status);
    /// @notice The account is not in the status the action needs.
    error RegistryWrongStatus(address account, Status status);
    /// @notice The caller is not an active seller.
    error RegistryNotActiveSeller(address account);
    /// @notice The device address is zero, a participant, or already registered.
    error RegistryDeviceUnavailable(address device);
    /// @notice The caller does not own this device.
    error RegistryNotDeviceOwner(address device, address caller);

    /// @notice Emitted when `account` applied to join with `role`.
    event Applied(address indexed account, Role role);
    /// @notice Emitted when an oracle approved `account`.
    event Approved(address indexed account, Role role, address indexed oracle);
    /// @notice Emitted when an oracle rejected the application of `account`.
    event Rejected(address indexed account, address indexed oracle);
    /// @notice Emitted when an oracle revoked the membership of `account`.
    event Revoked(address indexed account, address indexed oracle);
    /// @notice Emitted when `account` left the marketplace.
    event Left(address indexed account);
    /// @notice Emitted when `seller` registered `device`.
    event DeviceAdded(address indexed seller, address indexed device);
    /// @notice Emitted when `seller` removed `device`.
    event DeviceRemoved(address indexed seller, address indexed device);

    /// @param admin Receives DEFAULT_ADMIN_ROLE and ORACLE_ROLE; more oracles may be granted.
    constructor(address admin) {
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
        _grantRole(ORACLE_ROLE, admin);
    }

    /// @notice Apply to join with `role`. Allowed for new accounts and for accounts that
    /// were rejected or left; not while pending or active, and never after a revocation.
    /// @param role The role asked for (not None).
    function applyForRole(Role role) external {
        if (role == Role.None) revert RegistryInvalidRole();
        if (_deviceOwner[msg.sender] != address(0)) revert RegistryDeviceUnavailable(msg.sender);
        Participant storage p = _participants[msg.sender];
        Status s = p.status;
        if (s != Status.None && s != Status.Rejected && s != Status.Left) {
            revert RegistryCannotApply(msg.sender, s);
        }
        p.role = role;
        p.status = Status.Pending;
        emit Applied(msg.sender, role);
    }

    /// @notice Approve a pending application (oracle only).
    /// @param account The applicant.
    function approve(address account) external onlyRole(ORACLE_ROLE) {
        Participant storage p = _requireStatus(account, Status.Pending);
        p.status = Status.Active;
        emit Approved(account, p.role, msg.sender);
    }

    /// @notice Reject a pending application (oracle only).
    /// @param account The applicant.
    function reject(address account) external onlyRole(ORACLE_ROLE) {
        Participant storage p = _requireStatus(account, Status.Pending);
        p.status = Status.Rejected;
        emit Rejected(account, msg.sender);
    }

    /// @notice Ban an account that ever applied (oracle only), whatever its status now, so
    /// leaving first does not dodge a revocation. Final: the account cannot apply again.
    /// A revoked seller's devices stop acting for it at once.
    /// @param account The participant.
    function revoke(address account) external onlyRole(ORACLE_ROLE) {
        Participant storage p = _participants[account];
        if (p.status == Status.None || p.status == Status.Revoked) revert RegistryWrongStatus(account, p.status);
        p.status = Status.Revoked;
        emit Revoked(account, msg.sender);
    }

    /// @notice Leave the marketplace (active or pending). The caller may apply again later.
    function leave() external {
        Participant storage p = _participants[msg.sender];
        if (p.status != Status.Active && p.status != Status.Pending) {
            revert RegistryWrongStatus(msg.sender, p.status);
        }
        p.status = Status.Left;
        emit Left(msg.sender);
    }

    /// @notice Register `device` as one of the caller's devices (active sellers only).
    /// @param device The device's address (derived from its key); not a participant, not yet owned.
    function addDevice(address device) external {
        Participant storage p = _participants[msg.sender];
        if (p.role != Role.Seller || p.status != Status.Active) revert RegistryNotActiveSeller(msg.sender);
        if (
            device == address(0) || _deviceOwner[device] != address(0)
                || _participants[device].status != Status.None
        ) {
            revert RegistryDeviceUnavailable(device);
        }
        _deviceOwner[device] = msg.sender;
        _deviceCount[msg.sender] += 1;
        emit DeviceAdded(msg.sender, device);
    }

    /// @notice Remove one of the caller's devices. Works in any status, so a seller who left
    /// can still release its devices.
    /// @param device The device's address.
    function removeDevice(address device) external {
        if (_deviceOwner[device] != msg.sender) revert RegistryNotDeviceOwner(device, msg.sender);
        delete _deviceOwner[device];
        _deviceCount[msg.sender] -= 1;
        emit DeviceRemoved(msg.sender, device);
    }

    /// @notice Whether `account` is an approved, not revoked, not departed participant.
    function isActive(address account) external view returns (bool) {
        return _participants[account].status == Status.Active;
    }

    /// @notice Whether `account` is active with exactly `role`.
    function hasActiveRole(address account, Role role) external view returns (bool) {
        Participant storage p = _participants[account];
        return p.status == Status.Active && p.role == role;
    }

    /// @notice The role and status of `account`.
    function participant(address account) external view returns (Role role, Status status) {
        Participant storage p = _participants[account];
        return (p.role, p.status);
    }

    /// @notice The seller that owns `device`, or address(0).
    function deviceOwner(address device) external view returns (address) {
        return _deviceOwner[device];
    }

    /// @notice How many devices `seller` has registered.
    function deviceCount(address seller) external view returns (uint256) {
        return _deviceCount[seller];
    }

    /// @notice The seller `device` acts for while that owner is active in the Seller role,
    /// else address(0) (an owner that left and came back in another role has no devices).
    function activeSellerOf(address device) external view returns (address) {
        address seller = _deviceOwner[device];
        Participant storage p = _participants[seller];
        if (seller == address(0) || p.status != Status.Active || p.role != Role.Seller) return address(0);
        return seller;
    }

    function _requireStatus(address account, Status wanted) private view returns (Participant storage p) {
        p = _participants[account];
        if (p.status != wanted) revert RegistryWrongStatus(account, p.status);
    }
}

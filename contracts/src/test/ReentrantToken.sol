// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title TEST ONLY: an ERC-20 that calls back into a target during transfers.
/// @notice Lets tests prove that PaymentChannels refuses re-entry: set `target` and the
/// calldata to replay; every transfer then makes that call and records whether it succeeded.
contract ReentrantToken is ERC20 {
    address public target;
    bytes public payload;
    bool public lastCallSucceeded;
    bytes public lastRevertData;
    uint256 public attempts;

    constructor() ERC20("Reentrant Token (TEST ONLY)", "REENTER") {}

    /// @notice Mint `amount` to `to`.
    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }

    /// @notice Arm the attack: each later transfer calls `target_` with `payload_`.
    function arm(address target_, bytes calldata payload_) external {
        target = target_;
        payload = payload_;
    }

    function _update(address from, address to, uint256 value) internal override {
        super._update(from, to, value);
        if (target != address(0) && from != address(0)) {
            attempts += 1;
            (bool ok, bytes memory data) = target.call(payload);
            lastCallSucceeded = ok;
            lastRevertData = data;
        }
    }
}

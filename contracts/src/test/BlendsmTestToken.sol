// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title TEST ONLY: a freely mintable ERC-20 for the embedded chain, demos and tests.
/// @notice Anyone can mint any amount. Never deploy it where tokens should mean money.
contract BlendsmTestToken is ERC20 {
    constructor() ERC20("BlendSM Test Token (TEST ONLY)", "BTEST") {}

    /// @notice Mint `amount` to `to`; open to everyone, as befits a test token.
    function mint(address to, uint256 amount) external {
        _mint(to, amount);
    }
}

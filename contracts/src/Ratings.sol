// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {PaymentChannels} from "./PaymentChannels.sol";
import {Registry} from "./Registry.sol";

/// @title BlendSM Ratings: buyers and sellers rate each other after doing business.
/// @notice Once a channel has paid a claim or was settled, its payer and its payee may each
/// rate the other once for that channel, from 1 to 5, while the rater is an active member of
/// the Registry (so every rating comes from an account the oracle admitted and can revoke).
/// Running totals give an average per address, which Market's minimum-rating policy reads.
contract Ratings {
    /// @notice The channels whose history entitles a rating.
    PaymentChannels public immutable channels;
    /// @notice The membership registry: only active participants may rate.
    Registry public immutable registry;

    struct Score {
        uint64 count;
        uint192 total;
    }

    mapping(address account => Score) private _scores;
    mapping(bytes32 channelId => mapping(address rater => bool)) private _rated;

    /// @notice Scores run from 1 to 5.
    error RatingsInvalidScore(uint8 score);
    /// @notice The caller is neither the payer nor the payee of the channel.
    error RatingsNotParty(bytes32 channelId, address caller);
    /// @notice The rater is not an active participant of the Registry.
    error RatingsRaterNotActive(address rater);
    /// @notice The channel has had no claim and is not settled.
    error RatingsChannelNotEligible(bytes32 channelId);
    /// @notice The caller already rated for this channel.
    error RatingsAlreadyRated(bytes32 channelId, address rater);

    /// @notice Emitted when `rater` gave `ratee` `score` for `channelId`.
    event Rated(bytes32 indexed channelId, address indexed rater, address indexed ratee, uint8 score);

    /// @param channels_ The PaymentChannels contract.
    /// @param registry_ The Registry contract.
    constructor(PaymentChannels channels_, Registry registry_) {
        channels = channels_;
        registry = registry_;
    }

    /// @notice Rate the other party of `channelId` with `score` (1..5), once per channel
    /// (active Registry participants only).
    /// @param channelId A channel that has paid a claim or was settled.
    /// @param score 1 (worst) to 5 (best).
    function rate(bytes32 channelId, uint8 score) external {
        if (score < 1 || score > 5) revert RatingsInvalidScore(score);
        PaymentChannels.Channel memory c = channels.channel(channelId);
        address ratee;
        if (msg.sender == c.payer && c.payer != address(0)) {
            ratee = c.payee;
        } else if (msg.sender == c.payee && c.payee != address(0)) {
            ratee = c.payer;
        } else {
            revert RatingsNotParty(channelId, msg.sender);
        }
        if (c.totalClaimed == 0 && !c.settled) revert RatingsChannelNotEligible(channelId);
        if (!registry.isActive(msg.sender)) revert RatingsRaterNotActive(msg.sender);
        if (_rated[channelId][msg.sender]) revert RatingsAlreadyRated(channelId, msg.sender);
        _rated[channelId][msg.sender] = true;
        Score storage s = _scores[ratee];
        s.count += 1;
        s.total += score;
        emit Rated(channelId, msg.sender, ratee, score);
    }

    /// @notice How many ratings `account` received and their sum.
    function ratingOf(address account) external view returns (uint64 count, uint192 total) {
        Score storage s = _scores[account];
        return (s.count, s.total);
    }

    /// @notice The average rating of `account` times 100 (e.g. 350 for 3.5), 0 if unrated.
    function averageX100(address account) public view returns (uint256) {
        Score storage s = _scores[account];
        if (s.count == 0) return 0;
        return (uint256(s.total) * 100) / s.count;
    }

    /// @notice Whether `rater` already rated for `channelId`.
    function hasRated(bytes32 channelId, address rater) external view returns (bool) {
        return _rated[channelId][rater];
    }
}

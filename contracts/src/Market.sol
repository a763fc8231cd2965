// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {Ratings} from "./Ratings.sol";
import {Registry} from "./Registry.sol";

/// @title BlendSM Market: data products (MQTT topics), prices and access policies.
/// @notice An active seller registers an exact MQTT topic name (id = keccak256 of the name)
/// with a price per message, a payment token (ERC-20, or address(0) for the native coin) and
/// an access policy. Brokers read `canSubscribe` and `canPublish` (and follow the events to
/// keep their caches fresh). A price change applies to deliveries after the broker sees it.
/// A seller may mark a topic encrypted (`setEncrypted`): its devices seal payloads end to end
/// and the seller's key service hands topic keys only to entitled buyers. The mark is a public
/// statement for buyers and brokers; the contract cannot see payloads and does not enforce it.
/// Names under `blendsm/` are refused: that tree carries the brokers' own traffic.
contract Market {
    /// @notice Who may subscribe: every active buyer, only listed buyers, every active buyer
    /// but the listed ones, or buyers whose average rating reaches a minimum.
    enum Policy {
        Open,
        Allowlist,
        Denylist,
        MinRating
    }

    struct Topic {
        address seller;
        bool paused;
        Policy policy;
        uint16 minRatingX100;
        address token;
        uint256 price;
        string name;
    }

    /// @notice Membership: who is an active seller, buyer, and which seller a device serves.
    Registry public immutable registry;
    /// @notice Ratings read by the MinRating policy.
    Ratings public immutable ratings;

    /// The brokers' reserved topic tree: no market topic may live under it.
    bytes8 private constant _RESERVED_ROOT = "blendsm/";

    mapping(bytes32 topicId => Topic) private _topics;
    mapping(bytes32 topicId => mapping(address account => bool)) private _listed;
    bytes32[] private _topicIds;
    // Kept apart from `Topic` so that the `topic()` view and its ABI stay unchanged.
    mapping(bytes32 topicId => bool) private _encrypted;

    /// @notice The caller is not an active seller.
    error MarketNotActiveSeller(address caller);
    /// @notice A topic with this name exists already.
    error MarketTopicExists(bytes32 topicId);
    /// @notice No topic has this id.
    error MarketUnknownTopic(bytes32 topicId);
    /// @notice The caller is not the topic's seller.
    error MarketNotSeller(bytes32 topicId, address caller);
    /// @notice The name is empty, too long, has an MQTT wildcard or NUL, or starts with '$'.
    error MarketInvalidTopicName();
    /// @notice The name lies in the broker's reserved tree `blendsm/` (anchor notices, wrapped
    /// topic keys, control traffic).
    error MarketReservedName();
    /// @notice The minimum rating must be 100..500 for MinRating and 0 for other policies.
    error MarketInvalidMinRating(uint16 minRatingX100);
    /// @notice The topic is already in the asked pause state.
    error MarketPauseUnchanged(bytes32 topicId, bool paused);
    /// @notice The topic is already in the asked encryption state.
    error MarketEncryptionUnchanged(bytes32 topicId, bool encrypted);

    /// @notice Emitted when a seller registered a topic.
    event TopicCreated(
        bytes32 indexed topicId,
        address indexed seller,
        string name,
        address token,
        uint256 price,
        Policy policy,
        uint16 minRatingX100
    );
    /// @notice Emitted when a topic's price per message changed.
    event PriceChanged(bytes32 indexed topicId, uint256 oldPrice, uint256 newPrice);
    /// @notice Emitted when a topic's access policy changed.
    event PolicyChanged(bytes32 indexed topicId, Policy policy, uint16 minRatingX100);
    /// @notice Emitted when `account` was put on (`listed`) or taken off a topic's list.
    event AccessListUpdated(bytes32 indexed topicId, address indexed account, bool listed);
    /// @notice Emitted when a topic was paused: no subscriptions or publications.
    event TopicPaused(bytes32 indexed topicId);
    /// @notice Emitted when a paused topic was resumed.
    event TopicResumed(bytes32 indexed topicId);
    /// @notice Emitted when a topic was marked encrypted (`encrypted` true) or in clear.
    event TopicEncryptionChanged(bytes32 indexed topicId, bool encrypted);

    /// @param registry_ The Registry contract.
    /// @param ratings_ The Ratings contract.
    constructor(Registry registry_, Ratings ratings_) {
        registry = registry_;
        ratings = ratings_;
    }

    /// @notice Register the topic `name` (active sellers only).
    /// @param name Exact MQTT topic name: 1..65535 bytes, no '+', '#' or NUL, not starting with
    /// '$' nor with the reserved root `blendsm/`.
    /// @param price Price per delivered message, in the token's smallest unit.
    /// @param token ERC-20 address, or address(0) for the native coin.
    /// @param policy The access policy.
    /// @param minRatingX100 For MinRating, the lowest average rating times 100 (100..500); else 0.
    /// @return topicId keccak256(bytes(name)).
    function createTopic(string calldata name, uint256 price, address token, Policy policy, uint16 minRatingX100)
        external
        returns (bytes32 topicId)
    {
        if (!registry.hasActiveRole(msg.sender, Registry.Role.Seller)) revert MarketNotActiveSeller(msg.sender);
        _checkName(bytes(name));
        _checkMinRating(policy, minRatingX100);
        topicId = keccak256(bytes(name));
        if (_topics[topicId].seller != address(0)) revert MarketTopicExists(topicId);
        _topics[topicId] = Topic({
            seller: msg.sender,
            paused: false,
            policy: policy,
            minRatingX100: minRatingX100,
            token: token,
            price: price,
            name: name
        });
        _topicIds.push(topicId);
        emit TopicCreated(topicId, msg.sender, name, token, price, policy, minRatingX100);
    }

    /// @notice Change the price per message (topic's seller only).
    function setPrice(bytes32 topicId, uint256 newPrice) external {
        Topic storage t = _ownTopic(topicId);
        uint256 old = t.price;
        t.price = newPrice;
        emit PriceChanged(topicId, old, newPrice);
    }

    /// @notice Change the access policy (topic's seller only). Lists are kept across changes.
    function setPolicy(bytes32 topicId, Policy policy, uint16 minRatingX100) external {
        Topic storage t = _ownTopic(topicId);
        _checkMinRating(policy, minRatingX100);
        t.policy = policy;
        t.minRatingX100 = minRatingX100;
        emit PolicyChanged(topicId, policy, minRatingX100);
    }

    /// @notice Put `accounts` on (`listed` true) or off the topic's list, which is the
    /// allowlist under Allowlist and the denylist under Denylist (topic's seller only).
    function setAccess(bytes32 topicId, address[] calldata accounts, bool listed) external {
        _ownTopic(topicId);
        mapping(address => bool) storage list = _listed[topicId];
        for (uint256 i = 0; i < accounts.length; ++i) {
            list[accounts[i]] = listed;
            emit AccessListUpdated(topicId, accounts[i], listed);
        }
    }

    /// @notice Pause the topic: nobody may subscribe or publish (topic's seller only).
    function pause(bytes32 topicId) external {
        Topic storage t = _ownTopic(topicId);
        if (t.paused) revert MarketPauseUnchanged(topicId, true);
        t.paused = true;
        emit TopicPaused(topicId);
    }

    /// @notice Resume a paused topic (topic's seller only).
    function resume(bytes32 topicId) external {
        Topic storage t = _ownTopic(topicId);
        if (!t.paused) revert MarketPauseUnchanged(topicId, false);
        t.paused = false;
        emit TopicResumed(topicId);
    }

    /// @notice Mark the topic encrypted end to end (`encrypted` true) or in clear (topic's
    /// seller only). New topics are in clear. Reverts if the topic is already in that state.
    /// @param topicId The topic.
    /// @param encrypted Whether payloads of the topic are encrypted from now on.
    function setEncrypted(bytes32 topicId, bool encrypted) external {
        _ownTopic(topicId);
        if (_encrypted[topicId] == encrypted) revert MarketEncryptionUnchanged(topicId, encrypted);
        _encrypted[topicId] = encrypted;
        emit TopicEncryptionChanged(topicId, encrypted);
    }

    /// @notice Whether `buyer` may subscribe to `topicId` now: the topic exists and runs, its
    /// seller and the buyer are active in their roles, and the policy admits the buyer.
    function canSubscribe(address buyer, bytes32 topicId) external view returns (bool) {
        Topic storage t = _topics[topicId];
        if (t.seller == address(0) || t.paused) return false;
        if (!registry.hasActiveRole(t.seller, Registry.Role.Seller)) return false;
        if (!registry.hasActiveRole(buyer, Registry.Role.Buyer)) return false;
        Policy p = t.policy;
        if (p == Policy.Open) return true;
        if (p == Policy.Allowlist) return _listed[topicId][buyer];
        if (p == Policy.Denylist) return !_listed[topicId][buyer];
        return ratings.averageX100(buyer) >= t.minRatingX100;
    }

    /// @notice Whether `device` may publish to `topicId` now: the topic exists and runs and
    /// the device is registered to the topic's seller, who is active.
    function canPublish(address device, bytes32 topicId) external view returns (bool) {
        Topic storage t = _topics[topicId];
        if (t.seller == address(0) || t.paused) return false;
        return registry.activeSellerOf(device) == t.seller;
    }

    /// @notice The topic's record (seller address(0) if unknown).
    function topic(bytes32 topicId) external view returns (Topic memory) {
        return _topics[topicId];
    }

    /// @notice Whether the topic's seller marked it encrypted (false if the topic is unknown).
    function isEncrypted(bytes32 topicId) external view returns (bool) {
        return _encrypted[topicId];
    }

    /// @notice Whether `account` is on the topic's list.
    function isListed(bytes32 topicId, address account) external view returns (bool) {
        return _listed[topicId][account];
    }

    /// @notice How many topics were ever created.
    function topicCount() external view returns (uint256) {
        return _topicIds.length;
    }

    /// @notice The id of the `index`-th topic created.
    function topicIdAt(uint256 index) external view returns (bytes32) {
        return _topicIds[index];
    }

    function _ownTopic(bytes32 topicId) private view returns (Topic storage t) {
        t = _topics[topicId];
        if (t.seller == address(0)) revert MarketUnknownTopic(topicId);
        if (t.seller != msg.sender) revert MarketNotSeller(topicId, msg.sender);
    }

    function _checkMinRating(Policy policy, uint16 minRatingX100) private pure {
        bool ok = policy == Policy.MinRating
            ? (minRatingX100 >= 100 && minRatingX100 <= 500)
            : minRatingX100 == 0;
        if (!ok) revert MarketInvalidMinRating(minRatingX100);
    }

    function _checkName(bytes calldata name) private pure {
        uint256 n = name.length;
        if (n == 0 || n > 65_535 || name[0] == "$") revert MarketInvalidTopicName();
        for (uint256 i = 0; i < n; ++i) {
            bytes1 ch = name[i];
            if (ch == "+" || ch == "#" || ch == 0x00) revert MarketInvalidTopicName();
        }
        if (n >= 8 && bytes8(name[:8]) == _RESERVED_ROOT) revert MarketReservedName();
    }
}

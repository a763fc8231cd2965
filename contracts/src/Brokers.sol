// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {Market} from "./Market.sol";
import {Registry} from "./Registry.sol";

/// @title BlendSM Brokers: which brokers an operator runs, and which operators serve a topic.
/// @notice An active operator (Registry role Operator) registers its broker processes: each
/// one's own signing key and its endpoints (a short list of mqtt://, mqtts://, ws:// or wss://
/// URLs). A broker key belongs to one operator for good: retiring it is final and the key can
/// never be registered again, so that anchors, vouchers and claims made under a key always
/// name the same operator. A seller chooses the operators that serve each of its topics, or a
/// default list for all its topics. Clients read this contract (and follow its events) to find
/// the brokers of a topic and to move when an operator or a broker is revoked or retired:
/// nothing here disconnects anybody, the change is public and clients act on it.
contract Brokers {
    /// @notice Where a broker stands. Retired is final.
    enum BrokerStatus {
        None,
        Active,
        Retired
    }

    struct Broker {
        string endpoints;
        address operator;
        uint64 registeredAt;
        BrokerStatus status;
    }

    /// @notice The longest endpoint list, in bytes.
    uint256 public constant MAX_ENDPOINTS_LENGTH = 512;
    /// @notice The most URLs in one endpoint list.
    uint256 public constant MAX_ENDPOINTS = 8;
    /// @notice The most operators a seller may list for a topic or as its default.
    uint256 public constant MAX_OPERATORS = 16;

    /// @notice Membership: who is an active operator or seller.
    Registry public immutable registry;
    /// @notice The catalogue: who sells a topic.
    Market public immutable market;

    mapping(address brokerKey => Broker) private _brokers;
    address[] private _brokerKeys;
    mapping(address operator => address[]) private _operatorBrokers;
    mapping(bytes32 topicId => address[]) private _topicOperators;
    mapping(address seller => address[]) private _sellerOperators;

    /// @notice The caller is not an active operator.
    error BrokersNotActiveOperator(address caller);
    /// @notice The broker key is zero, a device, a participant other than the caller, or was
    /// registered before (by anyone; retired keys are never reused).
    error BrokersKeyUnavailable(address brokerKey);
    /// @notice No broker was registered under this key.
    error BrokersUnknownBroker(address brokerKey);
    /// @notice The caller is not the operator of this broker.
    error BrokersNotBrokerOperator(address brokerKey, address caller);
    /// @notice The broker is retired: it cannot change any more.
    error BrokersBrokerRetired(address brokerKey);
    /// @notice The endpoint list is empty, too long, has too many URLs, a URL without a known
    /// scheme (mqtt, mqtts, ws, wss) or host, or a byte outside printable ASCII.
    error BrokersInvalidEndpoints();
    /// @notice No topic has this id.
    error BrokersUnknownTopic(bytes32 topicId);
    /// @notice The caller is not the topic's seller.
    error BrokersNotSeller(bytes32 topicId, address caller);
    /// @notice The caller is not an active seller.
    error BrokersNotActiveSeller(address caller);
    /// @notice The operator list is longer than MAX_OPERATORS.
    error BrokersTooManyOperators(uint256 count);
    /// @notice A listed address is not an active operator, or is listed twice.
    error BrokersInvalidOperator(address operator);

    /// @notice Emitted when `operator` registered the broker `brokerKey` at `endpoints`.
    event BrokerRegistered(address indexed operator, address indexed brokerKey, string endpoints);
    /// @notice Emitted when the endpoints of `brokerKey` changed.
    event BrokerEndpointsChanged(address indexed operator, address indexed brokerKey, string endpoints);
    /// @notice Emitted when `brokerKey` was retired for good.
    event BrokerRetired(address indexed operator, address indexed brokerKey);
    /// @notice Emitted when the seller of `topicId` set the operators serving it (empty: the
    /// seller's default applies again).
    event TopicOperatorsChanged(bytes32 indexed topicId, address indexed seller, address[] operators);
    /// @notice Emitted when `seller` set its default operators (empty: any active operator).
    event SellerOperatorsChanged(address indexed seller, address[] operators);

    /// @param registry_ The Registry contract.
    /// @param market_ The Market contract.
    constructor(Registry registry_, Market market_) {
        registry = registry_;
        market = market_;
    }

    // --- brokers ---------------------------------------------------------------------------

    /// @notice Register a broker run by the caller (active operators only).
    /// @param brokerKey The address of the broker's own signing key: not zero, not a device,
    /// not a participant other than the caller, never registered before.
    /// @param endpoints Space-separated URLs, e.g. "mqtt://h:1883 mqtts://h:8883 wss://h/mqtt".
    function registerBroker(address brokerKey, string calldata endpoints) external {
        if (!registry.hasActiveRole(msg.sender, Registry.Role.Operator)) revert BrokersNotActiveOperator(msg.sender);
        if (
            brokerKey == address(0) || _brokers[brokerKey].status != BrokerStatus.None
                || registry.deviceOwner(brokerKey) != address(0)
                || (brokerKey != msg.sender && _hasApplied(brokerKey))
        ) {
            revert BrokersKeyUnavailable(brokerKey);
        }
        _checkEndpoints(bytes(endpoints));
        _brokers[brokerKey] = Broker({
            endpoints: endpoints,
            operator: msg.sender,
            registeredAt: uint64(block.timestamp),
            status: BrokerStatus.Active
        });
        _brokerKeys.push(brokerKey);
        _operatorBrokers[msg.sender].push(brokerKey);
        emit BrokerRegistered(msg.sender, brokerKey, endpoints);
    }

    /// @notice Replace the endpoints of one of the caller's active brokers.
    /// @param brokerKey The broker.
    /// @param endpoints The new list, validated as in registerBroker.
    function updateEndpoints(address brokerKey, string calldata endpoints) external {
        Broker storage b = _ownBroker(brokerKey);
        _checkEndpoints(bytes(endpoints));
        b.endpoints = endpoints;
        emit BrokerEndpointsChanged(msg.sender, brokerKey, endpoints);
    }

    /// @notice Retire one of the caller's brokers for good. Works in any operator status, so
    /// an operator that left or was revoked can still take its brokers down.
    /// @param brokerKey The broker.
    function retireBroker(address brokerKey) external {
        Broker storage b = _ownBroker(brokerKey);
        b.status = BrokerStatus.Retired;
        emit BrokerRetired(msg.sender, brokerKey);
    }

    /// @notice The broker's record (operator address(0) if unknown).
    function broker(address brokerKey) external view returns (Broker memory) {
        return _brokers[brokerKey];
    }

    /// @notice The operator that registered `brokerKey` (address(0) if none did); retired
    /// brokers keep theirs. PaymentChannels reads it to check a lane.
    function brokerOperator(address brokerKey) external view returns (address) {
        return _brokers[brokerKey].operator;
    }

    /// @notice Whether the broker is registered, not retired, and its operator is active.
    function isActiveBroker(address brokerKey) public view returns (bool) {
        Broker storage b = _brokers[brokerKey];
        return b.status == BrokerStatus.Active && registry.hasActiveRole(b.operator, Registry.Role.Operator);
    }

    /// @notice How many brokers were ever registered, by anyone.
    function brokerCount() external view returns (uint256) {
        return _brokerKeys.length;
    }

    /// @notice The key of the `index`-th broker registered.
    function brokerAt(uint256 index) external view returns (address) {
        return _brokerKeys[index];
    }

    /// @notice How many brokers `operator` ever registered.
    function operatorBrokerCount(address operator) external view returns (uint256) {
        return _operatorBrokers[operator].length;
    }

    /// @notice Every broker key `operator` ever registered, in order (retired ones included).
    function operatorBrokers(address operator) external view returns (address[] memory) {
        return _operatorBrokers[operator];
    }

    // --- which operators serve a topic ------------------------------------------------------

    /// @notice Set the operators that serve `topicId` (the topic's seller only). An empty list
    /// clears it, so the seller's default applies again.
    /// @param topicId The topic.
    /// @param operators At most MAX_OPERATORS distinct active operators.
    function setTopicOperators(bytes32 topicId, address[] calldata operators) external {
        address seller = market.topic(topicId).seller;
        if (seller == address(0)) revert BrokersUnknownTopic(topicId);
        if (seller != msg.sender) revert BrokersNotSeller(topicId, msg.sender);
        _checkOperators(operators);
        _topicOperators[topicId] = operators;
        emit TopicOperatorsChanged(topicId, msg.sender, operators);
    }

    /// @notice Set the operators that serve every topic of the caller that has no list of its
    /// own (active sellers only). An empty list clears it: any active operator may serve.
    /// @param operators At most MAX_OPERATORS distinct active operators.
    function setSellerOperators(address[] calldata operators) external {
        if (!registry.hasActiveRole(msg.sender, Registry.Role.Seller)) revert BrokersNotActiveSeller(msg.sender);
        _checkOperators(operators);
        _sellerOperators[msg.sender] = operators;
        emit SellerOperatorsChanged(msg.sender, operators);
    }

    /// @notice The operator list set for `topicId` itself, as set (unfiltered).
    function topicOperators(bytes32 topicId) external view returns (address[] memory) {
        return _topicOperators[topicId];
    }

    /// @notice The default operator list of `seller`, as set (unfiltered).
    function sellerOperators(address seller) external view returns (address[] memory) {
        return _sellerOperators[seller];
    }

    /// @notice Who serves `topicId` now. The topic's own list if set, else its seller's
    /// default; only operators still active are returned, so a list whose operators were all
    /// revoked yields nobody (fail closed), never "anyone". `anyOperator` is true only when
    /// neither list is set: then every active operator may serve. An unknown topic: nobody.
    /// @return anyOperator Whether every active operator may serve the topic.
    /// @return operators The active operators chosen, when `anyOperator` is false.
    function servingOperators(bytes32 topicId) external view returns (bool anyOperator, address[] memory operators) {
        address seller = market.topic(topicId).seller;
        if (seller == address(0)) return (false, new address[](0));
        address[] storage chosen = _chosen(topicId, seller);
        if (chosen.length == 0) return (true, new address[](0));
        uint256 n = 0;
        for (uint256 i = 0; i < chosen.length; ++i) {
            if (registry.hasActiveRole(chosen[i], Registry.Role.Operator)) ++n;
        }
        operators = new address[](n);
        n = 0;
        for (uint256 i = 0; i < chosen.length; ++i) {
            if (registry.hasActiveRole(chosen[i], Registry.Role.Operator)) operators[n++] = chosen[i];
        }
        return (false, operators);
    }

    /// @notice Whether `operator` may serve `topicId` now: it is an active operator and the
    /// topic's list (or its seller's default) names it, or neither list is set.
    function isServing(bytes32 topicId, address operator) external view returns (bool) {
        address seller = market.topic(topicId).seller;
        if (seller == address(0)) return false;
        if (!registry.hasActiveRole(operator, Registry.Role.Operator)) return false;
        address[] storage chosen = _chosen(topicId, seller);
        if (chosen.length == 0) return true;
        for (uint256 i = 0; i < chosen.length; ++i) {
            if (chosen[i] == operator) return true;
        }
        return false;
    }

    // --- private ----------------------------------------------------------------------------

    function _chosen(bytes32 topicId, address seller) private view returns (address[] storage) {
        address[] storage own = _topicOperators[topicId];
        return own.length != 0 ? own : _sellerOperators[seller];
    }

    function _ownBroker(address brokerKey) private view returns (Broker storage b) {
        b = _brokers[brokerKey];
        if (b.status == BrokerStatus.None) revert BrokersUnknownBroker(brokerKey);
        if (b.operator != msg.sender) revert BrokersNotBrokerOperator(brokerKey, msg.sender);
        if (b.status == BrokerStatus.Retired) revert BrokersBrokerRetired(brokerKey);
    }

    function _hasApplied(address account) private view returns (bool) {
        (, Registry.Status status) = registry.participant(account);
        return status != Registry.Status.None;
    }

    function _checkOperators(address[] calldata operators) private view {
        uint256 n = operators.length;
        if (n > MAX_OPERATORS) revert BrokersTooManyOperators(n);
        for (uint256 i = 0; i < n; ++i) {
            address op = operators[i];
            if (!registry.hasActiveRole(op, Registry.Role.Operator)) revert BrokersInvalidOperator(op);
            for (uint256 j = 0; j < i; ++j) {
                if (operators[j] == op) revert BrokersInvalidOperator(op);
            }
        }
    }

    /// Endpoints: 1..MAX_ENDPOINTS URLs separated by single spaces, each `scheme://rest` with
    /// scheme mqtt, mqtts, ws or wss and a non-empty rest of printable ASCII (no spaces).
    function _checkEndpoints(bytes calldata text) private pure {
        uint256 n = text.length;
        if (n == 0 || n > MAX_ENDPOINTS_LENGTH) revert BrokersInvalidEndpoints();
        uint256 count = 0;
        uint256 start = 0;
        for (uint256 i = 0; i <= n; ++i) {
            if (i == n || text[i] == " ") {
                _checkUrl(text[start:i]);
                if (++count > MAX_ENDPOINTS) revert BrokersInvalidEndpoints();
                start = i + 1;
            } else if (uint8(text[i]) < 0x21 || uint8(text[i]) > 0x7e) {
                revert BrokersInvalidEndpoints();
            }
        }
    }

    function _checkUrl(bytes calldata url) private pure {
        uint256 sep = 0;
        uint256 n = url.length;
        while (sep < n && url[sep] != ":") ++sep;
        // "://" must follow the scheme, then a host (not another '/').
        if (sep + 3 >= n || url[sep + 1] != "/" || url[sep + 2] != "/" || url[sep + 3] == "/") {
            revert BrokersInvalidEndpoints();
        }
        bytes32 scheme = keccak256(url[:sep]);
        if (
            scheme != keccak256("mqtt") && scheme != keccak256("mqtts") && scheme != keccak256("ws")
                && scheme != keccak256("wss")
        ) {
            revert BrokersInvalidEndpoints();
        }
    }
}

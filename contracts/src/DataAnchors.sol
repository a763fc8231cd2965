// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {MerkleProof} from "@openzeppelin/contracts/utils/cryptography/MerkleProof.sol";
import {Registry} from "./Registry.sol";

/// @title BlendSM DataAnchors: Merkle roots of delivered messages, per broker.
/// @notice An active broker operator anchors the root of each batch of message leaves under
/// strictly increasing batch ids; an anchor is never overwritten. Anyone can then check that a
/// leaf was in a batch with an OpenZeppelin-compatible proof (sorted pairs, keccak256).
contract DataAnchors {
    /// @notice The membership registry that says who is an active broker operator.
    Registry public immutable registry;

    struct Anchor {
        bytes32 root;
        uint64 leafCount;
        uint64 anchoredAt;
        uint64 blockNumber;
    }

    mapping(address broker => mapping(uint256 batchId => Anchor)) private _anchors;
    /// @notice The highest batch id each broker anchored (0 before the first).
    mapping(address broker => uint256) public latestBatchId;

    /// @notice Only active participants with the Operator role may anchor.
    error DataAnchorsNotOperator(address caller);
    /// @notice Batch ids must grow strictly: `batchId` is not above `latest`.
    error DataAnchorsBatchIdNotIncreasing(uint256 batchId, uint256 latest);
    /// @notice A batch needs a non-zero root and at least one leaf.
    error DataAnchorsEmptyBatch();

    /// @notice Emitted when `broker` anchored `root` of `leafCount` leaves as `batchId`.
    event Anchored(address indexed broker, uint256 indexed batchId, bytes32 root, uint64 leafCount);

    /// @param registry_ The Registry contract.
    constructor(Registry registry_) {
        registry = registry_;
    }

    /// @notice Anchor a batch root (active broker operators only).
    /// @param batchId Above every batch id this broker anchored before.
    /// @param root The Merkle root of the batch's leaves.
    /// @param leafCount How many leaves the batch holds.
    function anchor(uint256 batchId, bytes32 root, uint64 leafCount) external {
        if (!registry.hasActiveRole(msg.sender, Registry.Role.Operator)) revert DataAnchorsNotOperator(msg.sender);
        uint256 latest = latestBatchId[msg.sender];
        if (batchId <= latest) revert DataAnchorsBatchIdNotIncreasing(batchId, latest);
        if (root == bytes32(0) || leafCount == 0) revert DataAnchorsEmptyBatch();
        latestBatchId[msg.sender] = batchId;
        _anchors[msg.sender][batchId] =
            Anchor({root: root, leafCount: leafCount, anchoredAt: uint64(block.timestamp), blockNumber: uint64(block.number)});
        emit Anchored(msg.sender, batchId, root, leafCount);
    }

    /// @notice The anchor of `broker`'s batch `batchId` (all zero if none).
    function anchorOf(address broker, uint256 batchId) external view returns (Anchor memory) {
        return _anchors[broker][batchId];
    }

    /// @notice Whether `leaf` is in `broker`'s anchored batch `batchId`, by `proof`.
    /// @param leaf The leaf hash (already double-hashed by the broker's leaf encoding).
    /// @param proof Sibling hashes from the leaf up to the root.
    function verify(address broker, uint256 batchId, bytes32 leaf, bytes32[] calldata proof)
        external
        view
        returns (bool)
    {
        bytes32 root = _anchors[broker][batchId].root;
        return root != bytes32(0) && MerkleProof.verifyCalldata(proof, root, leaf);
    }
}

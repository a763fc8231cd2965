"""blendsm.contracts: the on-chain half of BlendSM.

Solidity sources and their committed artifacts, deployment, connection, typed async bindings
of the marketplace contracts, the event follower, and development chains (TEST keys only),
in process or served over JSON-RPC (:func:`start_dev_node`, what ``blendsm node`` runs).
Importing this package imports web3; the device SDK never does.
"""

from __future__ import annotations

from blendsm.contracts._artifacts import (
    ARTIFACTS_DIR,
    COMPILER_SETTINGS,
    CONTRACT_NAMES,
    EVM_VERSION,
    LATER_CONTRACTS,
    MANIFEST_NAME,
    SOURCES_DIR,
    SUITE_CONTRACTS,
    load_artifact,
    load_manifest,
    source_hashes,
    verify_manifest,
)
from blendsm.contracts._bindings import (
    DataAnchors,
    Market,
    Marketplace,
    Ratings,
    Registry,
)
from blendsm.contracts._brokers import (
    MAX_LISTED_BROKERS,
    Brokers,
    split_endpoints,
)
from blendsm.contracts._channels import (
    Erc20,
    PaymentChannels,
)
from blendsm.contracts._compile import (
    compile_contracts,
    repository_root,
    solc_version,
)
from blendsm.contracts._connect import (
    EMBEDDED,
    connect,
    disconnect,
)
from blendsm.contracts._deploy import (
    DEFAULT_CHALLENGE_PERIOD,
    Deployment,
    contract_at,
    deploy_contract,
    deploy_later_contracts,
    deploy_suite,
)
from blendsm.contracts._devchain import (
    AnvilNode,
    find_anvil,
    free_port,
    new_embedded_chain,
    test_account,
)
from blendsm.contracts._devnode import (
    DEV_ACCOUNT_LABELS,
    DevChainRpc,
    DevNode,
    enrol_operator,
    start_dev_node,
)
from blendsm.contracts._events import (
    CallbackCursorStore,
    ChainEvent,
    Cursor,
    CursorStore,
    EventDecoder,
    EventFollower,
    FileCursorStore,
    MemoryCursorStore,
)
from blendsm.contracts._records import (
    ORACLE_ROLE,
    ZERO_ADDRESS,
    AnchorInfo,
    BrokerInfo,
    BrokerStatus,
    ChannelInfo,
    ChannelOpening,
    ClaimReceipt,
    CloseRequest,
    DomainInfo,
    Participant,
    Policy,
    RatingInfo,
    Role,
    ServingOperators,
    Settlement,
    Status,
    TopicCreation,
    TopicInfo,
    TxResult,
)
from blendsm.contracts._revert import (
    chain_errors,
    decode_revert,
)
from blendsm.contracts._transactor import (
    Transactor,
)

__all__ = [
    "ARTIFACTS_DIR",
    "COMPILER_SETTINGS",
    "CONTRACT_NAMES",
    "DEFAULT_CHALLENGE_PERIOD",
    "DEV_ACCOUNT_LABELS",
    "EMBEDDED",
    "EVM_VERSION",
    "LATER_CONTRACTS",
    "MANIFEST_NAME",
    "MAX_LISTED_BROKERS",
    "ORACLE_ROLE",
    "SOURCES_DIR",
    "SUITE_CONTRACTS",
    "ZERO_ADDRESS",
    "AnchorInfo",
    "AnvilNode",
    "BrokerInfo",
    "BrokerStatus",
    "Brokers",
    "CallbackCursorStore",
    "ChainEvent",
    "ChannelInfo",
    "ChannelOpening",
    "ClaimReceipt",
    "CloseRequest",
    "Cursor",
    "CursorStore",
    "DataAnchors",
    "Deployment",
    "DevChainRpc",
    "DevNode",
    "DomainInfo",
    "Erc20",
    "EventDecoder",
    "EventFollower",
    "FileCursorStore",
    "Market",
    "Marketplace",
    "MemoryCursorStore",
    "Participant",
    "PaymentChannels",
    "Policy",
    "RatingInfo",
    "Ratings",
    "Registry",
    "Role",
    "ServingOperators",
    "Settlement",
    "Status",
    "TopicCreation",
    "TopicInfo",
    "Transactor",
    "TxResult",
    "chain_errors",
    "compile_contracts",
    "connect",
    "contract_at",
    "decode_revert",
    "deploy_contract",
    "deploy_later_contracts",
    "deploy_suite",
    "disconnect",
    "enrol_operator",
    "find_anvil",
    "free_port",
    "load_artifact",
    "load_manifest",
    "new_embedded_chain",
    "repository_root",
    "solc_version",
    "source_hashes",
    "split_endpoints",
    "start_dev_node",
    "test_account",
    "verify_manifest",
]

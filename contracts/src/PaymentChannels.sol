// SPDX-License-Identifier: Apache-2.0
pragma solidity 0.8.28;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {Address} from "@openzeppelin/contracts/utils/Address.sol";
import {Math} from "@openzeppelin/contracts/utils/math/Math.sol";
import {ReentrancyGuard} from "@openzeppelin/contracts/utils/ReentrancyGuard.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {Brokers} from "./Brokers.sol";

/// @title BlendSM PaymentChannels: unidirectional buyer -> seller channels paid by vouchers.
/// @notice A payer (buyer) locks a deposit in ERC-20 tokens or the native coin for a payee
/// (seller), naming the broker operator that meters the channel and its fee in basis points.
/// The channel is split into lanes, one per broker that meters it (issue 14): a lane is the
/// operator's own address or the key of a broker the operator registered in `Brokers`. The
/// payer signs EIP-712 vouchers for a cumulative amount per lane; anyone may submit the newest
/// one of a lane to pay the payee (minus the operator's fee) the delta over what that lane
/// already claimed, capped by what the deposit still holds over all lanes, so the lanes
/// together never take more than the deposit and no voucher is paid twice. The payer leaves by
/// requesting a close: during the challenge period every lane may still claim, after it the
/// payer withdraws the rest. The payee may close at once cooperatively (it forfeits what other
/// lanes did not claim yet). Check order for a voucher (mirrored by the Python verifier):
/// channel state, then lane, then signature, then amount.
contract PaymentChannels is EIP712, ReentrancyGuard {
    using SafeERC20 for IERC20;

    /// @notice The highest operator fee a channel may carry: 10 %.
    uint16 public constant MAX_FEE_BPS = 1_000;
    uint16 private constant _BPS = 10_000;
    /// @notice EIP-712 type hash of a voucher (domain version "2": lanes).
    bytes32 public constant VOUCHER_TYPEHASH =
        keccak256("Voucher(bytes32 channelId,address lane,uint256 cumulativeAmount)");

    /// @notice Seconds between a payer's close request and its withdrawal.
    uint64 public immutable challengePeriod;
    /// @notice The one account that may wire `brokers`, once (Brokers is deployed after this
    /// contract: Ratings and Market, which Brokers needs, are built on this one).
    address public immutable deployer;
    /// @notice Who runs which broker: a lane other than the operator's own address must be a
    /// broker the channel's operator registered there. Zero until the deployer wires it.
    Brokers public brokers;

    struct Channel {
        address payer;
        uint16 feeBps;
        uint64 closesAt; // 0 while no close was requested
        bool settled; // funds paid out; the channel is over for good
        address payee;
        address operator;
        address token; // address(0) for the native coin
        uint256 deposit;
        uint256 totalClaimed; // over all lanes, never above deposit
    }

    mapping(bytes32 channelId => Channel) private _channels;
    mapping(bytes32 channelId => mapping(address lane => uint256)) private _laneClaimed;
    /// @notice Channels opened so far by each payer; part of the next channel id.
    mapping(address payer => uint256) public nonces;

    /// @notice The payee is zero or the payer itself.
    error PaymentChannelsInvalidPayee(address payee);
    /// @notice The fee is above MAX_FEE_BPS, or non-zero with no operator.
    error PaymentChannelsInvalidFee(uint16 feeBps);
    /// @notice Deposits and top-ups must be positive.
    error PaymentChannelsZeroAmount();
    /// @notice msg.value does not match: the amount for the native coin, zero for a token.
    error PaymentChannelsWrongValue(uint256 expected, uint256 sent);
    /// @notice The token moved a different amount than asked (fee-on-transfer tokens are refused).
    error PaymentChannelsTokenTransferMismatch(uint256 expected, uint256 received);
    /// @notice No channel has this id.
    error PaymentChannelsUnknownChannel(bytes32 channelId);
    /// @notice The channel was settled; nothing more can happen to it.
    error PaymentChannelsChannelSettled(bytes32 channelId);
    /// @notice Only the payer may do this.
    error PaymentChannelsNotPayer(address caller);
    /// @notice Only the payee may do this.
    error PaymentChannelsNotPayee(address caller);
    /// @notice A close was already requested (no top-ups, no second request).
    error PaymentChannelsClosing(bytes32 channelId, uint64 closesAt);
    /// @notice Withdrawal needs a close request first.
    error PaymentChannelsNotClosing(bytes32 channelId);
    /// @notice The challenge period is still running; withdraw after `closesAt`.
    error PaymentChannelsChallengePeriodActive(uint64 closesAt);
    /// @notice The challenge period is over; vouchers can no longer be claimed.
    error PaymentChannelsChallengePeriodOver(uint64 closesAt);
    /// @notice The signature is malformed or non-canonical (length, high s, v not 27/28).
    error PaymentChannelsInvalidSignature();
    /// @notice The voucher was signed by someone other than the payer.
    error PaymentChannelsInvalidSigner(address signer);
    /// @notice The voucher pays nothing over what its lane already claimed, or the deposit is
    /// fully claimed.
    error PaymentChannelsNothingToClaim(uint256 cumulativeAmount, uint256 claimed);
    /// @notice The lane is neither the channel's operator nor a broker that operator registered.
    error PaymentChannelsInvalidLane(address lane);
    /// @notice Only the deployer may wire Brokers, and only once, to a contract.
    error PaymentChannelsBrokersNotSettable(address caller);

    /// @notice Emitted when a channel was opened.
    event ChannelOpened(
        bytes32 indexed channelId,
        address indexed payer,
        address indexed payee,
        address operator,
        address token,
        uint256 deposit,
        uint16 feeBps
    );
    /// @notice Emitted when the payer added `amount`; `deposit` is the new total.
    event ChannelToppedUp(bytes32 indexed channelId, uint256 amount, uint256 deposit);
    /// @notice Emitted when a voucher of `lane` paid `payout` (of which `fee` to the operator);
    /// the receipt. `laneClaimed` below `cumulativeAmount` means the deposit cut the claim short.
    event ChannelClaimed(
        bytes32 indexed channelId,
        address indexed lane,
        uint256 cumulativeAmount,
        uint256 payout,
        uint256 fee,
        uint256 laneClaimed,
        uint256 totalClaimed
    );

    /// @notice Emitted when the payer requested a close; claims work until `closesAt`.
    event CloseRequested(bytes32 indexed channelId, uint64 closesAt);
    /// @notice Emitted when the channel was settled and `refund` went back to the payer.
    event ChannelSettled(bytes32 indexed channelId, uint256 refund);

    /// @param challengePeriod_ Seconds a payee has to claim after the payer's close request.
    constructor(uint64 challengePeriod_) EIP712("BlendSM PaymentChannels", "2") {
        challengePeriod = challengePeriod_;
        deployer = msg.sender;
    }

    /// @notice Wire the Brokers contract, once (deployer only). Until then only the operator's
    /// own lane can claim, so nothing is accepted that a later wiring would refuse. No event:
    /// it happens in the deployment itself and `brokers` is public and final.
    /// @param brokers_ The suite's Brokers contract.
    function setBrokers(Brokers brokers_) external {
        if (msg.sender != deployer || address(brokers) != address(0) || address(brokers_).code.length == 0) {
            revert PaymentChannelsBrokersNotSettable(msg.sender);
        }
        brokers = brokers_;
    }

    /// @notice Open a channel to `payee` with a deposit of `amount` of `token`.
    /// @param payee Receives the vouchered amounts (the seller).
    /// @param operator The broker operator that meters the channel and earns the fee; may be
    /// address(0) when `feeBps` is zero.
    /// @param token The ERC-20 token, or address(0) for the native coin (then send `amount`).
    /// @param amount The deposit; for a token, approve this contract first.
    /// @param feeBps The operator's share of each payout in basis points, at most MAX_FEE_BPS.
    /// @return channelId keccak256(chain id, this contract, payer, payee, token, payer nonce).
    function open(address payee, address operator, address token, uint256 amount, uint16 feeBps)
        external
        payable
        nonReentrant
        returns (bytes32 channelId)
    {
        if (payee == address(0) || payee == msg.sender) revert PaymentChannelsInvalidPayee(payee);
        if (feeBps > MAX_FEE_BPS || (operator == address(0) && feeBps != 0)) {
            revert PaymentChannelsInvalidFee(feeBps);
        }
        if (amount == 0) revert PaymentChannelsZeroAmount();
        uint256 nonce = nonces[msg.sender]++;
        channelId = keccak256(abi.encode(block.chainid, address(this), msg.sender, payee, token, nonce));
        _channels[channelId] = Channel({
            payer: msg.sender,
            feeBps: feeBps,
            closesAt: 0,
            settled: false,
            payee: payee,
            operator: operator,
            token: token,
            deposit: amount,
            totalClaimed: 0
        });
        emit ChannelOpened(channelId, msg.sender, payee, operator, token, amount, feeBps);
        _receive(token, amount);
    }

    /// @notice Add `amount` to an open channel's deposit (payer only, not while closing).
    /// @param channelId The channel.
    /// @param amount The amount to add; for the native coin send it as value.
    function topUp(bytes32 channelId, uint256 amount) external payable nonReentrant {
        Channel storage c = _live(channelId);
        if (msg.sender != c.payer) revert PaymentChannelsNotPayer(msg.sender);
        if (c.closesAt != 0) revert PaymentChannelsClosing(channelId, c.closesAt);
        if (amount == 0) revert PaymentChannelsZeroAmount();
        uint256 deposit = c.deposit + amount;
        c.deposit = deposit;
        emit ChannelToppedUp(channelId, amount, deposit);
        _receive(c.token, amount);
    }

    /// @notice Pay out a voucher of one lane: the payee gets the delta over what the lane
    /// claimed, capped by what the deposit still holds, minus the operator's fee. Anyone may
    /// call; the channel stays open.
    /// @param channelId The channel.
    /// @param lane The broker key the voucher names (or the operator's own address).
    /// @param cumulativeAmount The total the payer has authorised on this lane so far.
    /// @param signature The payer's 65-byte EIP-712 signature (r, s, v) of the voucher.
    function claim(bytes32 channelId, address lane, uint256 cumulativeAmount, bytes calldata signature)
        external
        nonReentrant
    {
        Channel storage c = _live(channelId);
        _requireClaimable(c);
        (uint256 payout, uint256 fee) = _settleVoucher(channelId, c, lane, cumulativeAmount, signature);
        _payOut(c, payout, fee);
    }

    /// @notice Start the exit: after `challengePeriod` seconds the payer may withdraw what was
    /// not claimed. Claims keep working until then (payer only).
    /// @param channelId The channel.
    function requestClose(bytes32 channelId) external nonReentrant {
        Channel storage c = _live(channelId);
        if (msg.sender != c.payer) revert PaymentChannelsNotPayer(msg.sender);
        if (c.closesAt != 0) revert PaymentChannelsClosing(channelId, c.closesAt);
        uint64 closesAt = uint64(block.timestamp) + challengePeriod;
        c.closesAt = closesAt;
        emit CloseRequested(channelId, closesAt);
    }

    /// @notice After the challenge period, settle the channel and refund the deposit minus
    /// what was claimed to the payer (payer only).
    /// @param channelId The channel.
    function withdraw(bytes32 channelId) external nonReentrant {
        Channel storage c = _live(channelId);
        if (msg.sender != c.payer) revert PaymentChannelsNotPayer(msg.sender);
        if (c.closesAt == 0) revert PaymentChannelsNotClosing(channelId);
        if (block.timestamp < c.closesAt) revert PaymentChannelsChallengePeriodActive(c.closesAt);
        _settle(channelId, c);
    }

    /// @notice Close at once with the payee's consent (payee only): claim the final voucher of
    /// one lane if it pays anything new, then settle and refund the rest to the payer. Other
    /// lanes should claim first: what they did not claim is refunded (the payee, who would
    /// have received it, gives it up by closing).
    /// @param channelId The channel.
    /// @param lane The lane of the final voucher.
    /// @param cumulativeAmount The final voucher's amount; when it pays nothing new (the lane
    /// is at or above it, or the deposit is fully claimed) nothing is paid and `signature` is
    /// not read.
    /// @param signature The payer's signature of the final voucher.
    function cooperativeClose(
        bytes32 channelId,
        address lane,
        uint256 cumulativeAmount,
        bytes calldata signature
    ) external nonReentrant {
        Channel storage c = _live(channelId);
        if (msg.sender != c.payee) revert PaymentChannelsNotPayee(msg.sender);
        _requireClaimable(c);
        uint256 payout;
        uint256 fee;
        if (cumulativeAmount > _laneClaimed[channelId][lane] && c.totalClaimed < c.deposit) {
            (payout, fee) = _settleVoucher(channelId, c, lane, cumulativeAmount, signature);
        }
        uint256 refund = c.deposit - c.totalClaimed;
        c.settled = true;
        emit ChannelSettled(channelId, refund);
        _payOut(c, payout, fee);
        _send(c.token, c.payer, refund);
    }

    /// @notice A channel's full state.
    function channel(bytes32 channelId) external view returns (Channel memory) {
        return _channels[channelId];
    }

    /// @notice What `lane` has claimed on `channelId` so far.
    function laneClaimed(bytes32 channelId, address lane) external view returns (uint256) {
        return _laneClaimed[channelId][lane];
    }

    /// @notice Whether `lane` may claim on `channelId`: the operator's own address, or a broker
    /// the operator registered (retired brokers still are: they may be paid for past delivery).
    function isLane(bytes32 channelId, address lane) public view returns (bool) {
        address operator = _channels[channelId].operator;
        if (lane == operator) return true;
        Brokers b = brokers;
        return operator != address(0) && address(b) != address(0) && b.brokerOperator(lane) == operator;
    }

    /// @notice The EIP-712 digest the payer signs for `cumulativeAmount` on `lane` of `channelId`.
    function voucherDigest(bytes32 channelId, address lane, uint256 cumulativeAmount)
        public
        view
        returns (bytes32)
    {
        return _hashTypedDataV4(keccak256(abi.encode(VOUCHER_TYPEHASH, channelId, lane, cumulativeAmount)));
    }

    /// @notice The EIP-712 domain separator of this contract on this chain.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    function _live(bytes32 channelId) private view returns (Channel storage c) {
        c = _channels[channelId];
        if (c.payer == address(0)) revert PaymentChannelsUnknownChannel(channelId);
        if (c.settled) revert PaymentChannelsChannelSettled(channelId);
    }

    function _requireClaimable(Channel storage c) private view {
        uint64 closesAt = c.closesAt;
        if (closesAt != 0 && block.timestamp >= closesAt) revert PaymentChannelsChallengePeriodOver(closesAt);
    }

    /// @dev Checks the voucher and records the claim; returns what to pay. Effects only.
    /// The lane gets min(cumulative, laneClaimed + (deposit - totalClaimed)) - laneClaimed.
    function _settleVoucher(
        bytes32 channelId,
        Channel storage c,
        address lane,
        uint256 cumulativeAmount,
        bytes calldata signature
    ) private returns (uint256 payout, uint256 fee) {
        if (!isLane(channelId, lane)) revert PaymentChannelsInvalidLane(lane);
        (address signer, ECDSA.RecoverError err,) =
            ECDSA.tryRecoverCalldata(voucherDigest(channelId, lane, cumulativeAmount), signature);
        if (err != ECDSA.RecoverError.NoError) revert PaymentChannelsInvalidSignature();
        if (signer != c.payer) revert PaymentChannelsInvalidSigner(signer);
        uint256 claimed = _laneClaimed[channelId][lane];
        uint256 total = c.totalClaimed;
        uint256 payable_ = Math.min(cumulativeAmount, claimed + (c.deposit - total));
        if (payable_ <= claimed) revert PaymentChannelsNothingToClaim(cumulativeAmount, claimed);
        payout = payable_ - claimed;
        fee = Math.mulDiv(payout, c.feeBps, _BPS); // no overflow, whatever the deposit
        _laneClaimed[channelId][lane] = payable_;
        total += payout;
        c.totalClaimed = total;
        emit ChannelClaimed(channelId, lane, cumulativeAmount, payout, fee, payable_, total);
    }

    function _settle(bytes32 channelId, Channel storage c) private {
        uint256 refund = c.deposit - c.totalClaimed;
        c.settled = true;
        emit ChannelSettled(channelId, refund);
        _send(c.token, c.payer, refund);
    }

    function _payOut(Channel storage c, uint256 payout, uint256 fee) private {
        _send(c.token, c.operator, fee);
        _send(c.token, c.payee, payout - fee);
    }

    function _receive(address token, uint256 amount) private {
        if (token == address(0)) {
            if (msg.value != amount) revert PaymentChannelsWrongValue(amount, msg.value);
            return;
        }
        if (msg.value != 0) revert PaymentChannelsWrongValue(0, msg.value);
        IERC20 erc20 = IERC20(token);
        uint256 before = erc20.balanceOf(address(this));
        erc20.safeTransferFrom(msg.sender, address(this), amount);
        uint256 received = erc20.balanceOf(address(this)) - before;
        if (received != amount) revert PaymentChannelsTokenTransferMismatch(amount, received);
    }

    function _send(address token, address to, uint256 amount) private {
        if (amount == 0) return;
        if (token == address(0)) {
            Address.sendValue(payable(to), amount);
        } else {
            IERC20(token).safeTransfer(to, amount);
        }
    }
}

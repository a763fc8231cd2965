"""Market: topic registration and validation, prices, access policies (with real ratings
for MinRating), pause/resume, the encrypted mark, and the brokers' canSubscribe/canPublish
checks.

Every test runs on the embedded chain and on anvil.
"""

from __future__ import annotations

from enum import IntEnum

import pytest
from eth_utils import keccak

pytestmark = pytest.mark.parametrize("chain", ["embedded", "anvil"], indirect=True)

ZERO = "0x" + "00" * 20
SELLER, BUYER, OPERATOR = 1, 2, 3
NAME = "sensors/room1/temperature"
PRICE = 1_000


class Policy(IntEnum):
    OPEN = 0
    ALLOWLIST = 1
    DENYLIST = 2
    MIN_RATING = 3


def tid(name: str) -> bytes:
    return keccak(name.encode())


@pytest.fixture
def members(chain, enrol, tx):
    """seller and buyer2-as-second-seller ("other"), buyer and operator active; devices
    "device" (seller's) and "device2" (other's) registered."""
    enrol("seller", SELLER)
    enrol("buyer2", SELLER)
    enrol("buyer", BUYER)
    enrol("operator", OPERATOR)
    tx(chain.Registry.functions.addDevice(chain.addr("device")), "seller")
    tx(chain.Registry.functions.addDevice(chain.addr("device2")), "buyer2")


@pytest.fixture
def topic(chain, mkt, tx, members):
    """A running Open topic of "seller"; its id."""
    tx(mkt.createTopic(NAME, PRICE, ZERO, Policy.OPEN, 0), "seller")
    return tid(NAME)


def can_sub(chain, label, topic_id):
    return chain.Market.functions.canSubscribe(chain.addr(label), topic_id).call()


def can_pub(chain, label, topic_id):
    return chain.Market.functions.canPublish(chain.addr(label), topic_id).call()


# ---------------------------------------------------------------- creation


def test_wired_to_registry_and_ratings(chain, mkt):
    assert mkt.registry().call() == chain.Registry.address
    assert mkt.ratings().call() == chain.Ratings.address
    assert mkt.topicCount().call() == 0


@pytest.mark.parametrize(
    ("policy", "min_rating", "native"),
    [
        (Policy.OPEN, 0, True),
        (Policy.ALLOWLIST, 0, False),
        (Policy.DENYLIST, 0, True),
        (Policy.MIN_RATING, 100, False),
        (Policy.MIN_RATING, 350, True),
        (Policy.MIN_RATING, 500, True),
    ],
)
def test_create_topic(chain, mkt, tx, events, reverts, members, policy, min_rating, native):
    seller = chain.addr("seller")
    token = ZERO if native else chain.Token.address
    topic_id = mkt.createTopic(NAME, 7, token, policy, min_rating).call({"from": seller})
    assert topic_id == keccak(text=NAME)
    receipt = tx(mkt.createTopic(NAME, 7, token, policy, min_rating), "seller")
    assert events(receipt) == [
        (
            "Market.TopicCreated",
            {
                "topicId": topic_id,
                "seller": seller,
                "name": NAME,
                "token": token,
                "price": 7,
                "policy": policy,
                "minRatingX100": min_rating,
            },
        )
    ]
    assert tuple(mkt.topic(topic_id).call()) == (seller, False, policy, min_rating, token, 7, NAME)
    assert mkt.topicCount().call() == 1
    assert mkt.topicIdAt(0).call() == topic_id
    with reverts("Panic", 0x32):  # array index out of bounds
        mkt.topicIdAt(1).call()


def test_unknown_topic_record_is_empty(mkt):
    assert tuple(mkt.topic(tid("nothing")).call()) == (ZERO, False, 0, 0, ZERO, 0, "")


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "a/b/c",
        "/leading",
        "trailing/",
        "a//b",
        "x$y",
        "with space",
        "ünïcødé/温度",
        "a" * 1000,
        "0",
    ],
    ids=lambda n: repr(n[:20]),
)
def test_valid_topic_names(chain, mkt, tx, members, name):
    tx(mkt.createTopic(name, 0, ZERO, Policy.OPEN, 0), "seller")
    assert mkt.topic(tid(name)).call()[6] == name


@pytest.mark.parametrize(
    "name",
    ["", "+", "#", "a/+/b", "a/#", "sensor#1", "x+", "a\x00b", "\x00", "$SYS/broker", "$", "$x/+"],
    ids=repr,
)
def test_invalid_topic_names(chain, mkt, reverts, members, name):
    with reverts("MarketInvalidTopicName"):
        mkt.createTopic(name, 0, ZERO, Policy.OPEN, 0).transact({"from": chain.addr("seller")})
    assert mkt.topicCount().call() == 0


@pytest.mark.parametrize(
    "name",
    [
        "blendsm/anchors",
        "blendsm/keys/" + "ab" * 32 + "/0x" + "11" * 20,
        "blendsm/ctl/0x" + "11" * 20 + "/notice",
        "blendsm/",
        "blendsm/anything/else",
    ],
    ids=lambda n: repr(n[:20]),
)
def test_reserved_names_are_refused(chain, mkt, reverts, members, name):
    """The broker's own tree ``blendsm/`` is no market topic (anchor notices, wrapped keys)."""
    with reverts("MarketReservedName"):
        mkt.createTopic(name, 0, ZERO, Policy.OPEN, 0).transact({"from": chain.addr("seller")})
    assert mkt.topicCount().call() == 0


@pytest.mark.parametrize("name", ["blendsm", "blendsmX", "blendsm_anchors", "x/blendsm/anchors"])
def test_names_next_to_the_reserved_tree_are_valid(chain, mkt, tx, members, name):
    tx(mkt.createTopic(name, 0, ZERO, Policy.OPEN, 0), "seller")
    assert mkt.topic(tid(name)).call()[6] == name


def test_topic_name_longer_than_65535_bytes_is_refused(chain, mkt, reverts, members):
    with reverts("MarketInvalidTopicName"):
        mkt.createTopic("a" * 65_536, 0, ZERO, Policy.OPEN, 0).call({"from": chain.addr("seller")})


@pytest.mark.parametrize(
    ("policy", "min_rating"),
    [
        (Policy.MIN_RATING, 0),
        (Policy.MIN_RATING, 99),
        (Policy.MIN_RATING, 501),
        (Policy.MIN_RATING, 65_535),
        (Policy.OPEN, 1),
        (Policy.ALLOWLIST, 100),
        (Policy.DENYLIST, 500),
    ],
)
def test_min_rating_rules(chain, mkt, tx, reverts, members, policy, min_rating):
    with reverts("MarketInvalidMinRating", min_rating):
        mkt.createTopic(NAME, 0, ZERO, policy, min_rating).transact({"from": chain.addr("seller")})
    tx(mkt.createTopic(NAME, 0, ZERO, Policy.OPEN, 0), "seller")
    with reverts("MarketInvalidMinRating", min_rating):
        mkt.setPolicy(tid(NAME), policy, min_rating).transact({"from": chain.addr("seller")})
    assert tuple(mkt.topic(tid(NAME)).call())[2:4] == (Policy.OPEN, 0)


def test_duplicate_topic_is_refused(chain, mkt, reverts, topic):
    for label in ("seller", "buyer2"):
        with reverts("MarketTopicExists", topic):
            mkt.createTopic(NAME, 1, ZERO, Policy.DENYLIST, 0).transact({"from": chain.addr(label)})
    assert mkt.topicCount().call() == 1
    assert mkt.topic(topic).call()[0] == chain.addr("seller")


def test_only_active_sellers_create_topics(chain, mkt, reg, tx, reverts, members):
    tx(reg.applyForRole(SELLER), "validator")  # pending seller
    tx(reg.applyForRole(SELLER), "stranger")
    tx(reg.approve(chain.addr("stranger")), "oracle")
    tx(reg.revoke(chain.addr("stranger")), "oracle")  # revoked seller
    tx(reg.leave(), "buyer2")  # a seller who left
    for label in ("buyer", "operator", "validator", "stranger", "buyer2", "device", "oracle"):
        caller = chain.addr(label)
        with reverts("MarketNotActiveSeller", caller):
            mkt.createTopic(NAME, 0, ZERO, Policy.OPEN, 0).transact({"from": caller})
    assert mkt.topicCount().call() == 0


def test_topic_count_and_ids_in_creation_order(chain, mkt, tx, reverts, members):
    names = ["t/0", "t/1", "u/2", "t/3"]
    for i, name in enumerate(names):
        tx(mkt.createTopic(name, i, ZERO, Policy.OPEN, 0), "seller" if i % 2 == 0 else "buyer2")
    assert mkt.topicCount().call() == 4
    assert [mkt.topicIdAt(i).call() for i in range(4)] == [tid(n) for n in names]
    assert mkt.topic(tid("t/1")).call()[0] == chain.addr("buyer2")
    with reverts("Panic", 0x32):
        mkt.topicIdAt(4).call()


# ---------------------------------------------------------------- owner-only setters


def test_set_price(chain, mkt, tx, events, topic):
    receipt = tx(mkt.setPrice(topic, 2_500), "seller")
    assert events(receipt) == [
        ("Market.PriceChanged", {"topicId": topic, "oldPrice": PRICE, "newPrice": 2_500})
    ]
    receipt = tx(mkt.setPrice(topic, 0), "seller")
    assert events(receipt, "PriceChanged") == [{"topicId": topic, "oldPrice": 2_500, "newPrice": 0}]
    assert mkt.topic(topic).call()[5] == 0


def test_set_policy_keeps_lists(chain, mkt, tx, events, topic):
    receipt = tx(mkt.setAccess(topic, [chain.addr("buyer")], True), "seller")
    assert events(receipt) == [
        (
            "Market.AccessListUpdated",
            {"topicId": topic, "account": chain.addr("buyer"), "listed": True},
        )
    ]
    receipt = tx(mkt.setPolicy(topic, Policy.DENYLIST, 0), "seller")
    assert events(receipt) == [
        ("Market.PolicyChanged", {"topicId": topic, "policy": Policy.DENYLIST, "minRatingX100": 0})
    ]
    assert not can_sub(chain, "buyer", topic)
    receipt = tx(mkt.setPolicy(topic, Policy.MIN_RATING, 250), "seller")
    assert events(receipt, "PolicyChanged") == [
        {"topicId": topic, "policy": Policy.MIN_RATING, "minRatingX100": 250}
    ]
    assert tuple(mkt.topic(topic).call())[2:4] == (Policy.MIN_RATING, 250)
    tx(mkt.setPolicy(topic, Policy.ALLOWLIST, 0), "seller")
    assert mkt.isListed(topic, chain.addr("buyer")).call()  # the list survived
    assert can_sub(chain, "buyer", topic)
    assert tuple(mkt.topic(topic).call())[2:4] == (Policy.ALLOWLIST, 0)


def test_set_access_lists_and_unlists(chain, mkt, tx, events, topic):
    accounts = [chain.addr("buyer"), chain.addr("stranger"), chain.addr("buyer")]
    receipt = tx(mkt.setAccess(topic, accounts, True), "seller")
    assert events(receipt) == [
        ("Market.AccessListUpdated", {"topicId": topic, "account": a, "listed": True})
        for a in accounts
    ]
    assert mkt.isListed(topic, chain.addr("buyer")).call()
    assert mkt.isListed(topic, chain.addr("stranger")).call()
    assert not mkt.isListed(topic, chain.addr("operator")).call()
    receipt = tx(mkt.setAccess(topic, [chain.addr("stranger")], False), "seller")
    assert events(receipt) == [
        (
            "Market.AccessListUpdated",
            {"topicId": topic, "account": chain.addr("stranger"), "listed": False},
        )
    ]
    assert not mkt.isListed(topic, chain.addr("stranger")).call()
    assert mkt.isListed(topic, chain.addr("buyer")).call()
    assert events(tx(mkt.setAccess(topic, [], True), "seller")) == []
    # lists are per topic
    tx(mkt.createTopic("other/topic", 0, ZERO, Policy.ALLOWLIST, 0), "seller")
    assert not mkt.isListed(tid("other/topic"), chain.addr("buyer")).call()


def test_pause_and_resume(chain, mkt, tx, events, reverts, topic):
    seller = {"from": chain.addr("seller")}
    with reverts("MarketPauseUnchanged", topic, False):
        mkt.resume(topic).transact(seller)
    assert events(tx(mkt.pause(topic), "seller")) == [("Market.TopicPaused", {"topicId": topic})]
    assert mkt.topic(topic).call()[1] is True
    with reverts("MarketPauseUnchanged", topic, True):
        mkt.pause(topic).transact(seller)
    assert events(tx(mkt.resume(topic), "seller")) == [("Market.TopicResumed", {"topicId": topic})]
    assert mkt.topic(topic).call()[1] is False


def test_set_encrypted_toggles_and_emits(chain, mkt, tx, events, reverts, topic):
    seller = {"from": chain.addr("seller")}
    before = tuple(mkt.topic(topic).call())
    assert mkt.isEncrypted(topic).call() is False  # new topics are in clear
    with reverts("MarketEncryptionUnchanged", topic, False):
        mkt.setEncrypted(topic, False).transact(seller)
    for flag in (True, False, True):
        assert events(tx(mkt.setEncrypted(topic, flag), "seller")) == [
            ("Market.TopicEncryptionChanged", {"topicId": topic, "encrypted": flag})
        ]
        assert mkt.isEncrypted(topic).call() is flag
    with reverts("MarketEncryptionUnchanged", topic, True):
        mkt.setEncrypted(topic, True).transact(seller)
    # The topic record (and its ABI) is untouched; so are the brokers' answers.
    assert tuple(mkt.topic(topic).call()) == before
    assert can_sub(chain, "buyer", topic)
    assert can_pub(chain, "device", topic)


def test_encrypted_mark_is_per_topic_and_false_when_unknown(chain, mkt, tx, topic):
    tx(mkt.createTopic("other/topic", PRICE, ZERO, Policy.OPEN, 0), "seller")
    tx(mkt.setEncrypted(topic, True), "seller")
    assert mkt.isEncrypted(topic).call() is True
    assert mkt.isEncrypted(tid("other/topic")).call() is False
    assert mkt.isEncrypted(tid("no/such/topic")).call() is False


def test_encrypted_mark_survives_pause_and_policy_changes(chain, mkt, tx, topic):
    tx(mkt.setEncrypted(topic, True), "seller")
    tx(mkt.pause(topic), "seller")
    tx(mkt.setPolicy(topic, Policy.DENYLIST, 0), "seller")
    tx(mkt.resume(topic), "seller")
    assert mkt.isEncrypted(topic).call() is True


def owner_only_calls(mkt, topic_id, buyer):
    return {
        "setPrice": mkt.setPrice(topic_id, 5),
        "setPolicy": mkt.setPolicy(topic_id, Policy.DENYLIST, 0),
        "setAccess": mkt.setAccess(topic_id, [buyer], True),
        "pause": mkt.pause(topic_id),
        "resume": mkt.resume(topic_id),
        "setEncrypted": mkt.setEncrypted(topic_id, True),
    }


@pytest.mark.parametrize(
    "fn", ["setPrice", "setPolicy", "setAccess", "pause", "resume", "setEncrypted"]
)
def test_setters_are_owner_only(chain, mkt, tx, reverts, topic, fn):
    if fn == "resume":
        tx(mkt.pause(topic), "seller")
    before = tuple(mkt.topic(topic).call())
    for label in ("buyer2", "buyer", "device", "oracle", "stranger"):
        caller = chain.addr(label)
        with reverts("MarketNotSeller", topic, caller):
            owner_only_calls(mkt, topic, chain.addr("buyer"))[fn].transact({"from": caller})
    # An unknown topic is reported as such, even to a seller.
    unknown = tid("no/such/topic")
    for label in ("seller", "stranger"):
        with reverts("MarketUnknownTopic", unknown):
            owner_only_calls(mkt, unknown, chain.addr("buyer"))[fn].transact(
                {"from": chain.addr(label)}
            )
    assert tuple(mkt.topic(topic).call()) == before
    assert not mkt.isListed(topic, chain.addr("buyer")).call()
    assert not mkt.isEncrypted(topic).call()


# ---------------------------------------------------------------- canSubscribe


def test_can_subscribe_open(chain, mkt, reg, tx, topic):
    assert can_sub(chain, "buyer", topic)
    # only active buyers
    for label in ("seller", "buyer2", "operator", "device", "stranger", "oracle"):
        assert not can_sub(chain, label, topic), label
    tx(reg.applyForRole(BUYER), "stranger")
    assert not can_sub(chain, "stranger", topic)  # pending
    tx(reg.approve(chain.addr("stranger")), "oracle")
    assert can_sub(chain, "stranger", topic)
    tx(reg.leave(), "stranger")
    assert not can_sub(chain, "stranger", topic)  # left
    tx(reg.revoke(chain.addr("buyer")), "oracle")
    assert not can_sub(chain, "buyer", topic)  # revoked
    assert not can_sub(chain, "buyer", tid("no/such/topic"))


def test_can_subscribe_allowlist(chain, mkt, tx, enrol, topic):
    enrol("stranger", BUYER)
    tx(mkt.setPolicy(topic, Policy.ALLOWLIST, 0), "seller")
    assert not can_sub(chain, "buyer", topic)
    tx(mkt.setAccess(topic, [chain.addr("buyer"), chain.addr("operator")], True), "seller")
    assert can_sub(chain, "buyer", topic)
    assert not can_sub(chain, "stranger", topic)  # active buyer, not listed
    assert not can_sub(chain, "operator", topic)  # listed, but not a buyer
    tx(mkt.setAccess(topic, [chain.addr("buyer")], False), "seller")
    assert not can_sub(chain, "buyer", topic)


def test_can_subscribe_denylist(chain, mkt, tx, enrol, topic):
    enrol("stranger", BUYER)
    tx(mkt.setPolicy(topic, Policy.DENYLIST, 0), "seller")
    assert can_sub(chain, "buyer", topic)
    assert can_sub(chain, "stranger", topic)
    tx(mkt.setAccess(topic, [chain.addr("buyer")], True), "seller")
    assert not can_sub(chain, "buyer", topic)
    assert can_sub(chain, "stranger", topic)
    assert not can_sub(chain, "operator", topic)  # not listed, but not a buyer
    tx(mkt.setAccess(topic, [chain.addr("buyer")], False), "seller")
    assert can_sub(chain, "buyer", topic)


def test_can_subscribe_min_rating_with_real_ratings(
    chain, mkt, tx, enrol, open_channel, voucher, topic
):
    enrol("stranger", BUYER)  # never rated: average 0
    ratings, channels = chain.Ratings.functions, chain.PaymentChannels.functions

    def deal_rated(score):
        cid = open_channel("buyer", "seller", amount=10**15)
        lane = channels.channel(cid).call()[5]  # the operator's own lane (zero: none)
        tx(channels.claim(cid, lane, 10**12, voucher("buyer", cid, 10**12)), "seller")
        tx(ratings.rate(cid, score), "seller")

    deal_rated(4)
    assert ratings.averageX100(chain.addr("buyer")).call() == 400
    tx(mkt.setPolicy(topic, Policy.MIN_RATING, 400), "seller")
    assert can_sub(chain, "buyer", topic)
    assert not can_sub(chain, "stranger", topic)
    tx(mkt.setPolicy(topic, Policy.MIN_RATING, 401), "seller")
    assert not can_sub(chain, "buyer", topic)

    deal_rated(3)  # (4 + 3) / 2 = 3.5
    assert ratings.averageX100(chain.addr("buyer")).call() == 350
    tx(mkt.setPolicy(topic, Policy.MIN_RATING, 350), "seller")
    assert can_sub(chain, "buyer", topic)
    tx(mkt.setPolicy(topic, Policy.MIN_RATING, 351), "seller")
    assert not can_sub(chain, "buyer", topic)
    tx(mkt.setPolicy(topic, Policy.MIN_RATING, 100), "seller")
    assert can_sub(chain, "buyer", topic)
    assert not can_sub(chain, "stranger", topic)  # unrated stays out at the lowest bar
    # the list plays no part under MinRating
    tx(mkt.setAccess(topic, [chain.addr("buyer")], True), "seller")
    assert can_sub(chain, "buyer", topic)


@pytest.mark.parametrize("policy", [Policy.OPEN, Policy.ALLOWLIST, Policy.DENYLIST])
def test_paused_topic_admits_nobody(chain, mkt, tx, topic, policy):
    tx(mkt.setPolicy(topic, policy, 0), "seller")
    if policy == Policy.ALLOWLIST:
        tx(mkt.setAccess(topic, [chain.addr("buyer")], True), "seller")
    assert can_sub(chain, "buyer", topic)
    assert can_pub(chain, "device", topic)
    tx(mkt.pause(topic), "seller")
    assert not can_sub(chain, "buyer", topic)
    assert not can_pub(chain, "device", topic)
    tx(mkt.resume(topic), "seller")
    assert can_sub(chain, "buyer", topic)
    assert can_pub(chain, "device", topic)


def test_inactive_seller_closes_its_topics(chain, mkt, reg, tx, topic):
    seller = chain.addr("seller")
    tx(reg.leave(), "seller")
    assert not can_sub(chain, "buyer", topic)
    assert not can_pub(chain, "device", topic)
    tx(reg.applyForRole(SELLER), "seller")
    assert not can_sub(chain, "buyer", topic)  # pending again
    tx(reg.approve(seller), "oracle")
    assert can_sub(chain, "buyer", topic)
    assert can_pub(chain, "device", topic)
    tx(reg.revoke(seller), "oracle")
    assert not can_sub(chain, "buyer", topic)
    assert not can_pub(chain, "device", topic)


# ---------------------------------------------------------------- canPublish


def test_can_publish(chain, mkt, reg, tx, topic):
    assert can_pub(chain, "device", topic)  # the seller's own device
    assert not can_pub(chain, "device2", topic)  # another seller's device
    for label in ("seller", "buyer", "stranger", "operator"):  # not devices
        assert not can_pub(chain, label, topic), label
    assert not can_pub(chain, "device", tid("no/such/topic"))
    # the other seller's device publishes to the other seller's topic only
    tx(mkt.createTopic("other/topic", 0, ZERO, Policy.OPEN, 0), "buyer2")
    assert can_pub(chain, "device2", tid("other/topic"))
    assert not can_pub(chain, "device", tid("other/topic"))
    # a removed device stops at once
    tx(reg.removeDevice(chain.addr("device")), "seller")
    assert not can_pub(chain, "device", topic)
    tx(reg.addDevice(chain.addr("device")), "seller")
    assert can_pub(chain, "device", topic)
    # a revoked seller's devices stop
    tx(reg.revoke(chain.addr("seller")), "oracle")
    assert not can_pub(chain, "device", topic)
    assert can_pub(chain, "device2", tid("other/topic"))


def test_can_publish_stops_when_seller_comes_back_as_buyer(chain, mkt, reg, tx, topic):
    tx(reg.leave(), "seller")
    tx(reg.applyForRole(BUYER), "seller")
    tx(reg.approve(chain.addr("seller")), "oracle")
    assert not can_sub(chain, "buyer", topic)  # the topic's seller is no seller any more
    assert not can_pub(chain, "device", topic)

"""The web dashboard in Debian's headless Chromium against a real broker on anvil: the page
shows the on-chain topic and real paid traffic, updates live without a reload, lists an anchor
right after it is made, verifies a real leaf's proof on chain, turns its health badge red when
the chain node goes away, and renders a non-blank screenshot."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import TimeoutException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from blendsm.broker import RunningBroker, parse_config
from blendsm.contracts import test_account
from blendsm.device_sdk import (
    ConnectTokenSigner,
    EnvelopeSigner,
    MessageDomain,
    VoucherDomain,
    encode_voucher,
    message_leaf,
    sign_voucher,
)

from .conftest import StartProxiedBroker, enrol_market

PRICE = 2_500
"""Price of one message on the topic, in wei: distinctive, so the page must show this one."""
TOPIC = "paid/dashboard"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[webdriver.Chrome]:
    """Debian's chromium through its own chromedriver (selenium-manager never runs: both paths
    are given), with a throwaway profile and nothing fetched from the network."""
    options = webdriver.ChromeOptions()
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1280,900",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(arg)
    options.binary_location = CHROMIUM
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        # --window-size is the outer window: pin the viewport itself to 1280x900 (headless
        # Chromium keeps room for browser UI that it does not draw)
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False},
        )
        yield driver
    finally:
        driver.quit()


@dataclass
class Page:
    """The dashboard in a browser; every selenium call runs on a thread so the broker, on
    this test's event loop, keeps serving the page's requests."""

    driver: webdriver.Chrome

    async def run(self, fn: Callable[[], Any]) -> Any:
        return await asyncio.to_thread(fn)

    async def text(self, css: str) -> str:
        return str(await self.run(lambda: self.driver.find_element(By.CSS_SELECTOR, css).text))

    async def attr(self, css: str, name: str) -> str | None:
        def read() -> str | None:
            return self.driver.find_element(By.CSS_SELECTOR, css).get_attribute(name)

        return await asyncio.to_thread(read)

    async def rows(self, table: str) -> list[list[str]]:
        """Cell texts of ``#table tbody tr``, row by row."""

        def read() -> list[list[str]]:
            return [
                [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                for tr in self.driver.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")
            ]

        return await asyncio.to_thread(read)

    async def until(
        self, what: str, check: Callable[[webdriver.Chrome], Any], within: float
    ) -> Any:
        """Wait for ``check`` to hold on the live page (no reload); fail naming ``what``."""

        def wait() -> Any:
            return WebDriverWait(self.driver, within, poll_frequency=0.1).until(check)

        try:
            return await self.run(wait)
        except TimeoutException:
            raise AssertionError(f"dashboard never showed {what}") from None


def _text_is(css: str, expected: str) -> Callable[[webdriver.Chrome], bool]:
    def check(driver: webdriver.Chrome) -> bool:
        with contextlib.suppress(WebDriverException):
            return bool(driver.find_element(By.CSS_SELECTOR, css).text == expected)
        return False

    return check


def _attr_is(css: str, name: str, expected: str) -> Callable[[webdriver.Chrome], bool]:
    def check(driver: webdriver.Chrome) -> bool:
        with contextlib.suppress(WebDriverException):
            return bool(driver.find_element(By.CSS_SELECTOR, css).get_attribute(name) == expected)
        return False

    return check


@dataclass
class Dashboard:
    """A broker with its HTTP API on a free port, talking to anvil through a TCP proxy that
    the test can cut (the chain node going away)."""

    running: RunningBroker
    proxy: Any
    topic_id: bytes

    @property
    def url(self) -> str:
        http = self.running.http
        assert http is not None
        return f"http://127.0.0.1:{http.port}/"


@pytest.fixture
async def dashboard(
    chain: Any, mp: Any, tmp_path: Path, proxied_broker: StartProxiedBroker
) -> Dashboard:
    topic_id = await enrol_market(mp, chain, TOPIC, price=PRICE, buyers=("buyer",))
    # the endpoint is not dialled: the broker is handed the proxied connection
    config = parse_config(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "chain": {"endpoint": "embedded", "confirmations": 0, "poll_interval": 0.05},
            "payments": {"credit_messages": 5, "settlement": {"interval_seconds": 3600}},
            "data_dir": str(tmp_path / "data"),
            "http": {"host": "127.0.0.1", "port": 0},
        }
    )
    proxied = await proxied_broker(config)
    return Dashboard(proxied.running, proxied.proxy, topic_id)


def _check_screenshot(png: bytes) -> Image.Image:
    """A real render: window size, many colours, dark text in the header and in the tables."""
    image = Image.open(io.BytesIO(png)).convert("RGB")
    width, height = image.size
    assert width == 1280
    assert height == 900
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None
    assert len(colours) > 200, f"only {len(colours)} colours: a blank page?"

    def dark_pixels(box: tuple[int, int, int, int]) -> int:
        region = image.crop(box).convert("L")
        return sum(count for value, count in enumerate(region.histogram()) if value < 80)

    assert dark_pixels((0, 0, width, 60)) > 300, "no dark text in the header"
    assert dark_pixels((0, 290, width, 620)) > 1000, "no dark text in the tables"
    light = sum(v for c, v in enumerate(image.convert("L").histogram()) if c > 200)
    assert light > width * height // 2, "not dark text on a light background"
    return image


@pytest.mark.parametrize("chain", ["anvil"], indirect=True)
async def test_dashboard_shows_live_market_in_headless_chromium(
    chain: Any,
    mp: Any,
    dashboard: Dashboard,
    browser: webdriver.Chrome,
    mqtt_client: Any,
    tmp_path: Path,
) -> None:
    started = time.monotonic()
    deployment = chain.deployment
    running = dashboard.running
    service = running.service
    message_domain = MessageDomain(deployment.chain_id, deployment.address("Registry"))
    clients: list[Any] = []

    def client(label: str) -> Any:
        account = chain.accounts[label]
        made = mqtt_client(
            running.host,
            running.port,
            account=account,
            signer=ConnectTokenSigner(
                bytes(account.key), deployment.chain_id, chain.addr("operator")
            ),
            envelope_signer=EnvelopeSigner(bytes(account.key), message_domain),
        )
        clients.append(made)
        return made

    try:
        opened = await mp("buyer").channels.open(
            chain.addr("seller"), chain.addr("operator"), None, 10**15
        )
        channel = opened.channel_id
        deadline = time.monotonic() + 10
        while service.view.channel(channel) is None:
            assert time.monotonic() < deadline, "broker never saw the channel"
            await asyncio.sleep(0.02)
        buyer, device = client("buyer"), client("device")
        assert await buyer.connect() == 0
        assert await device.connect() == 0
        assert await buyer.subscribe(TOPIC) == [0]
        for i in range(3):
            await device.publish(TOPIC, b"reading %d" % i, qos=1)
        assert len([m for m in await buyer.got.drain(within=1.0) if m.topic == TOPIC]) == 3

        broker_key = test_account("dashboard-broker").address
        await mp("operator").brokers.register_broker(broker_key, "mqtt://b1:1883 wss://b1/mqtt")

        page = Page(browser)
        await page.run(lambda: browser.get(dashboard.url))
        await page.until("the paid deliveries", _text_is("#counter-deliveries", "3"), 10)
        assert await page.text("#last-updated") != "never"
        await page.run(lambda: browser.execute_script("window.__notReloaded = true;"))

        # the topic, with its on-chain price, and the health badge
        on_chain = await mp("stranger").market.topic(dashboard.topic_id)
        assert on_chain is not None
        assert on_chain.price == PRICE
        topics = await page.rows("topics")
        assert [row[0] for row in topics] == [TOPIC]
        assert topics[0][2] == f"{PRICE} wei"
        price = "#topics tbody tr td:nth-child(3) .amount"
        assert await page.attr(price, "data-wei") == str(on_chain.price)
        assert await page.attr(price, "title") == f"{on_chain.price} wei"
        seller = chain.addr("seller")
        assert topics[0][1] == f"{seller[:6]}…{seller[-4:]}"
        assert "open" in topics[0][3].lower()
        assert topics[0][6] == "any operator"  # Brokers.servingOperators: no list set
        # the broker registered on chain, with its endpoints
        brokers = await page.rows("brokers")
        operator = chain.addr("operator")
        assert brokers == [
            [
                f"{broker_key[:6]}…{broker_key[-4:]}",
                f"{operator[:6]}…{operator[-4:]}",
                "active",
                "mqtt://b1:1883 wss://b1/mqtt",
            ]
        ]
        assert await page.attr("#health", "data-state") == "healthy"
        assert await page.text("#health") == "chain healthy"
        assert await page.text("#chain-id") == str(deployment.chain_id)

        # more traffic and a voucher: the counters move on the open page
        for i in range(3, 5):
            await device.publish(TOPIC, b"reading %d" % i, qos=1)
        domain = VoucherDomain(deployment.chain_id, deployment.address("PaymentChannels"))
        voucher = sign_voucher(
            bytes(chain.accounts["buyer"].key), domain, channel, chain.addr("operator"), 5 * PRICE
        )
        await buyer.publish(
            f"blendsm/ctl/{chain.addr('buyer').lower()}/voucher", encode_voucher(voucher), qos=1
        )
        await page.until("5 paid deliveries", _text_is("#counter-deliveries", "5"), 10)
        await page.until("the voucher", _text_is("#counter-vouchers", "1"), 10)
        await page.until(
            "the vouchered amount", _attr_is("#counter-vouchered", "data-wei", str(5 * PRICE)), 10
        )
        assert await page.text("#counter-vouchered") == f"{5 * PRICE} wei"
        assert await page.attr("#counter-vouchered", "title") == "12500 wei"
        assert await page.run(lambda: browser.execute_script("return window.__notReloaded"))
        channels = await page.rows("channels")
        assert len(channels) == 1
        payer = chain.addr("buyer")
        assert channels[0][1] == f"{payer[:6]}…{payer[-4:]}"
        assert channels[0][3] == "0.001 ETH"
        assert channels[0][-1] == "open"

        # a message whose leaf we compute ourselves, then an anchor: a row appears, and
        # the leaf's proof verifies on chain
        device.sequence += 1
        envelope = device.envelope_signer.sign(
            TOPIC, b"to be proven", device.sequence, int(time.time() * 1000)
        )
        await device.publish(TOPIC, envelope.encode(), qos=1, sign=False)
        leaf = message_leaf(message_domain, TOPIC, envelope)
        await page.until("the sixth paid delivery", _text_is("#counter-deliveries", "6"), 10)
        assert service.anchorer is not None
        records = await service.anchorer.anchor_now()
        assert [r.leaf_count for r in records] == [6]
        batch = str(records[0].batch_id)

        def anchored(driver: webdriver.Chrome) -> bool:
            with contextlib.suppress(WebDriverException):
                for tr in driver.find_elements(By.CSS_SELECTOR, "#anchors tbody tr"):
                    cells = [td.text for td in tr.find_elements(By.TAG_NAME, "td")]
                    if cells and cells[0] == batch and cells[2] == "6":
                        return True
            return False

        await page.until("the anchored batch", anchored, 10)
        assert await page.run(lambda: browser.execute_script("return window.__notReloaded"))

        def look_up() -> None:
            field = browser.find_element(By.ID, "proof-leaf")
            field.clear()
            field.send_keys("0x" + leaf.hex())
            browser.find_element(By.ID, "proof-submit").click()

        await page.run(look_up)
        await page.until(
            "the verified proof", _attr_is("#proof-result", "data-state", "verified"), 10
        )
        assert "verified on chain" in await page.text("#proof-verdict")
        assert "0x" + records[0].root.hex() in await page.text("#proof-result")

        png = await page.run(browser.get_screenshot_as_png)
        image = _check_screenshot(png)
        image.save(tmp_path / "dashboard.png")

        def look_up_unknown() -> None:
            field = browser.find_element(By.ID, "proof-leaf")
            field.clear()
            field.send_keys("0x" + "00" * 31 + "01")
            browser.find_element(By.ID, "proof-submit").click()

        await page.run(look_up_unknown)
        await page.until("an unknown leaf", _attr_is("#proof-result", "data-state", "missing"), 10)

        # the chain node goes away: the badge turns red
        await dashboard.proxy.stop()
        await page.until("the chain as unavailable", _attr_is("#health", "data-state", "down"), 10)
        assert await page.text("#health") == "chain unavailable"
        colour = await page.run(
            lambda: browser.execute_script(
                "return getComputedStyle(document.getElementById('health')).backgroundColor"
            )
        )
        red, green, blue = (int(x) for x in colour[colour.index("(") + 1 : -1].split(",")[:3])
        assert red > 150, colour
        assert green < 100, colour
        assert blue < 100, colour

        # the broker's HTTP API goes away: a stale banner, the last figures kept
        assert await page.run(
            lambda: not browser.find_element(By.ID, "stale-banner").is_displayed()
        )
        http = running.http
        assert http is not None
        await http.stop()
        await page.until(
            "the stale banner", lambda d: d.find_element(By.ID, "stale-banner").is_displayed(), 10
        )
        assert await page.text("#health") == "broker offline"
        assert await page.text("#counter-deliveries") == "6"
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                c.close()
    print(f"\ndashboard test body: {time.monotonic() - started:.1f} s")

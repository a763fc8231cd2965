// BlendSM dashboard: polls the broker's JSON API once a second and updates the page in place.
// No framework and no build step, so the page works straight from the installed wheel offline.
"use strict";

(() => {
  const POLL_MS = 1000;
  const FETCH_TIMEOUT_MS = 3000;
  const ANCHOR_LIMIT = 20;
  const WEI_PER_ETH = 10n ** 18n;
  const SMALL_WEI = 10n ** 12n;
  const ZERO_ADDRESS = "0x0000000000000000000000000000000000000000";

  const $ = (id) => document.getElementById(id);

  // Amounts are wei integers and may exceed 2^53: keep their exact digits as BigInt when the
  // browser exposes the JSON source text (Chromium >= 114), else fall back to Number.
  function parseJson(text) {
    return JSON.parse(text, (_key, value, context) => {
      if (typeof value === "number" && !Number.isSafeInteger(value) && context && /^-?\d+$/.test(context.source)) {
        return BigInt(context.source);
      }
      return value;
    });
  }

  async function getJson(path) {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), FETCH_TIMEOUT_MS);
    try {
      const response = await fetch(path, { cache: "no-store", signal: controller.signal });
      const body = parseJson(await response.text());
      return { ok: response.ok, status: response.status, body };
    } finally {
      clearTimeout(timer);
    }
  }

  function toBigInt(value) {
    if (value === null || value === undefined || value === "") return 0n;
    try {
      return BigInt(value);
    } catch {
      return 0n;
    }
  }

  /** "0.000000000000005" style: exact, trailing zeros trimmed, thousands grouped. */
  function formatEth(wei) {
    const value = toBigInt(wei);
    const sign = value < 0n ? "-" : "";
    const abs = value < 0n ? -value : value;
    const whole = (abs / WEI_PER_ETH).toLocaleString("en-US");
    const frac = (abs % WEI_PER_ETH).toString().padStart(18, "0").replace(/0+$/, "");
    return sign + whole + (frac ? "." + frac : "");
  }

  function isNative(token) {
    return !token || token.toLowerCase() === ZERO_ADDRESS;
  }

  /** An amount element: ETH (or token units) shown, exact wei on hover and in data-wei. */
  function amount(wei, token) {
    const span = document.createElement("span");
    span.className = "amount";
    const exact = toBigInt(wei).toString();
    span.dataset.wei = exact;
    if (isNative(token)) {
      // Per-message prices are tiny: below a micro-ether, wei reads better than 0.000…
      const abs = toBigInt(wei) < 0n ? -toBigInt(wei) : toBigInt(wei);
      span.textContent = abs !== 0n && abs < SMALL_WEI ? exact + " wei" : formatEth(wei) + " ETH";
      span.title = exact + " wei";
    } else {
      span.textContent = formatEth(wei) + " tokens";
      span.title = exact + " base units of token " + token;
    }
    return span;
  }

  /** "0x1234…abcd"; the full value stays in the title. ``head`` 0 keeps it whole. */
  function short(hex, head = 6, tail = 4) {
    if (!hex) return "–";
    if (!head || hex.length <= head + tail + 1) return hex;
    return hex.slice(0, head) + "…" + (tail ? hex.slice(-tail) : "");
  }

  function code(hex, head, tail) {
    const el = document.createElement("code");
    el.className = "addr";
    el.textContent = short(hex, head, tail);
    if (hex) el.title = hex;
    return el;
  }

  function text(value) {
    return document.createTextNode(value === null || value === undefined ? "–" : String(value));
  }

  function pill(label, kind) {
    const el = document.createElement("span");
    el.className = "pill pill-" + kind;
    el.textContent = label;
    return el;
  }

  function formatTime(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const date = new Date(Number(seconds) * 1000);
    return date.toISOString().replace("T", " ").replace(/\.\d+Z$/, " UTC");
  }

  /** A <time>: the UTC clock time when it is today, else the date too; full stamp on hover. */
  function timeCell(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const full = formatTime(seconds);
    const el = document.createElement("time");
    el.dateTime = new Date(Number(seconds) * 1000).toISOString();
    el.title = full;
    const today = new Date().toISOString().slice(0, 10);
    el.textContent = full.startsWith(today) ? full.slice(11) : full.slice(0, 16) + " UTC";
    return el;
  }

  function formatDuration(seconds) {
    let s = Math.max(0, Math.floor(Number(seconds) || 0));
    const d = Math.floor(s / 86400);
    s -= d * 86400;
    const h = Math.floor(s / 3600);
    s -= h * 3600;
    const m = Math.floor(s / 60);
    s -= m * 60;
    if (d) return `${d}d ${h}h ${m}m`;
    if (h) return `${h}h ${m}m ${s}s`;
    if (m) return `${m}m ${s}s`;
    return `${s}s`;
  }

  /** Replace a table body's rows, keyed so unchanged rows are not rebuilt (no flicker). */
  function fillTable(tableId, items, key, cells) {
    const tbody = $(tableId).tBodies[0];
    const rows = items.map((item) => {
      const tr = document.createElement("tr");
      tr.dataset.key = String(key(item));
      for (const content of cells(item)) {
        const td = document.createElement("td");
        if (content instanceof Node) td.appendChild(content);
        else td.appendChild(text(content));
        tr.appendChild(td);
      }
      return tr;
    });
    const old = Array.from(tbody.rows);
    const same =
      old.length === rows.length && old.every((tr, i) => tr.isEqualNode(rows[i]));
    if (!same) tbody.replaceChildren(...rows);
    $(tableId + "-empty").hidden = items.length > 0;
  }

  function setText(id, value) {
    const el = $(id);
    const next = value === null || value === undefined ? "–" : String(value);
    if (el.textContent !== next) el.textContent = next;
  }

  function setAmount(id, wei) {
    const el = $(id);
    const fresh = amount(wei, null);
    el.dataset.wei = fresh.dataset.wei;
    el.title = fresh.title;
    if (el.textContent !== fresh.textContent) el.textContent = fresh.textContent;
  }

  function renderStatus(status) {
    const operator = $("operator");
    operator.textContent = short(status.operator, 8, 6);
    operator.title = status.operator || "";
    setText("chain-id", status.chain_id);
    setText("block", status.block);
    setText("sessions", status.sessions);
    setText("uptime", formatDuration(status.uptime_s));
    const health = $("health");
    const healthy = status.chain_healthy === true;
    health.dataset.state = healthy ? "healthy" : "down";
    health.textContent = healthy ? "chain healthy" : "chain unavailable";
    health.title = healthy ? "the broker's chain view is current" : status.chain_unhealthy_reason || "";
    const c = status.counters || {};
    setText("counter-deliveries", c.deliveries_paid);
    setText("counter-denied", c.deliveries_denied);
    setText("counter-vouchers", c.vouchers_accepted);
    setText("counter-vouchers-refused", c.vouchers_refused);
    setText("counter-anchors", c.anchors_confirmed);
    setAmount("counter-charged", c.amount_charged);
    setAmount("counter-vouchered", c.amount_vouchered);
    setAmount("counter-claimed", c.amount_claimed);
    renderContracts(status.contracts || {});
  }

  function renderContracts(contracts) {
    const list = $("contracts");
    const names = Object.keys(contracts).sort();
    const signature = names.map((n) => n + "=" + contracts[n]).join(",");
    if (list.dataset.signature === signature) return;
    list.dataset.signature = signature;
    list.replaceChildren(
      ...names.map((name) => {
        const div = document.createElement("div");
        const dt = document.createElement("dt");
        dt.textContent = name;
        const dd = document.createElement("dd");
        dd.appendChild(code(contracts[name], 10, 8));
        div.append(dt, dd);
        return div;
      }),
    );
  }

  function stars(rating) {
    const span = document.createElement("span");
    span.className = "rating";
    const count = Number((rating && rating.count) || 0);
    if (!count) {
      span.textContent = "unrated";
      span.classList.add("muted");
      return span;
    }
    let average = Number(rating.average) || 0;
    if (average > 5) average /= 100; // tolerate the contract's ×100 fixed point
    const full = Math.round(average);
    const shown = document.createElement("span");
    shown.className = "stars";
    shown.setAttribute("aria-hidden", "true");
    shown.textContent = "★".repeat(full) + "☆".repeat(Math.max(0, 5 - full));
    span.append(shown, ` ${average.toFixed(1)} (${count})`);
    span.title = `${average.toFixed(2)} of 5 from ${count} rating${count === 1 ? "" : "s"}`;
    span.setAttribute("aria-label", span.title);
    return span;
  }

  function flags(topic) {
    const span = document.createElement("span");
    if (topic.paused) span.appendChild(pill("paused", "warn"));
    if (topic.encrypted) span.appendChild(pill("encrypted", "info"));
    if (!topic.paused && !topic.encrypted) span.appendChild(pill("active", "ok"));
    return span;
  }

  function renderTopics(topics) {
    fillTable("topics", topics, (t) => t.topic_id, (t) => {
      const name = document.createElement("span");
      name.className = "topic-name";
      name.textContent = t.name;
      name.title = t.topic_id;
      let policy = String(t.policy ?? "–").toLowerCase();
      if (t.min_rating) policy += ` (rating ≥ ${t.min_rating})`;
      return [name, code(t.seller), amount(t.price, t.token), policy, stars(t.rating), flags(t),
        servedBy(t.serving)];
    });
  }

  /** Brokers.servingOperators: any active operator, the chosen ones, or nobody (fail closed). */
  function servedBy(serving) {
    if (!serving) return "–";
    if (serving.any_operator) return "any operator";
    if (!serving.operators.length) return pill("nobody", "bad");
    const span = document.createElement("span");
    serving.operators.forEach((op, i) => {
      if (i) span.appendChild(text(", "));
      span.appendChild(code(op));
    });
    return span;
  }

  function brokerState(b) {
    if (b.status === "retired") return pill("retired", "muted");
    if (!b.active) return pill("operator inactive", "bad");
    return pill("active", "ok");
  }

  function renderBrokers(brokers) {
    fillTable("brokers", brokers, (b) => b.broker, (b) => [
      code(b.broker),
      code(b.operator),
      brokerState(b),
      (b.endpoints || []).join(" "),
    ]);
  }

  function channelState(ch) {
    if (ch.settled) return pill("settled", "muted");
    if (ch.closing) {
      const el = pill("closing", "warn");
      if (ch.closes_at) el.title = "closes at " + formatTime(ch.closes_at);
      return el;
    }
    return pill("open", "ok");
  }

  function remainingBar(ch) {
    const deposit = toBigInt(ch.deposit);
    const remaining = toBigInt(ch.remaining);
    const percent = deposit > 0n ? Number((remaining * 1000n) / deposit) / 10 : 0;
    const wrap = document.createElement("span");
    wrap.className = "remaining";
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("role", "img");
    bar.setAttribute("aria-label", `${percent.toFixed(1)}% of the deposit left`);
    const fill = document.createElement("span");
    fill.className = "fill";
    fill.style.width = Math.min(100, Math.max(0, percent)) + "%";
    bar.appendChild(fill);
    wrap.append(bar, amount(ch.remaining, ch.token));
    return wrap;
  }

  function renderChannels(channels) {
    fillTable("channels", channels, (c) => c.channel_id, (c) => [
      code(c.channel_id, 10, 4),
      code(c.payer),
      code(c.payee),
      amount(c.deposit, c.token),
      amount(c.vouchered, c.token),
      amount(c.claimed, c.token),
      remainingBar(c),
      channelState(c),
    ]);
  }

  function anchorStatus(status) {
    const s = String(status || "unknown").toLowerCase();
    const kind = s === "confirmed" ? "ok" : s === "failed" ? "bad" : "warn";
    return pill(s, kind);
  }

  function renderAnchors(anchors) {
    fillTable("anchors", anchors, (a) => a.batch_id, (a) => [
      a.batch_id,
      code(a.root, 10, 8),
      a.leaf_count,
      anchorStatus(a.status),
      a.block ?? "–",
      timeCell(a.anchored_at),
    ]);
  }

  let failures = 0;

  function markOnline() {
    failures = 0;
    $("stale-banner").hidden = true;
    document.body.classList.remove("stale");
    const now = new Date();
    const el = $("last-updated");
    el.textContent = now.toLocaleTimeString("en-GB");
    el.dateTime = now.toISOString();
  }

  function markOffline(error) {
    failures += 1;
    const banner = $("stale-banner");
    banner.hidden = false;
    banner.title = String(error && error.message ? error.message : error);
    document.body.classList.add("stale");
    const health = $("health");
    health.dataset.state = "offline";
    health.textContent = "broker offline";
  }

  /** One poll. A failed status fetch means the broker is unreachable (page-wide banner); a
   *  failed table fetch only marks that table stale, so the rest keeps updating. */
  async function refresh() {
    const sources = [
      ["api/status", null, (body) => renderStatus(body)],
      ["api/topics", "topics", (body) => renderTopics(body.topics || [])],
      ["api/channels", "channels", (body) => renderChannels(body.channels || [])],
      [`api/anchors?limit=${ANCHOR_LIMIT}`, "anchors", (body) => renderAnchors(body.anchors || [])],
      ["api/brokers", "brokers", (body) => renderBrokers(body.brokers || [])],
    ];
    const results = await Promise.allSettled(sources.map(([path]) => getJson(path)));
    let statusError = null;
    results.forEach((result, i) => {
      const [, table, render] = sources[i];
      let error = null;
      if (result.status === "rejected") error = result.reason;
      else if (!result.value.ok) error = new Error(`HTTP ${result.value.status}`);
      else {
        try {
          render(result.value.body);
        } catch (exc) {
          error = exc;
        }
      }
      if (table) {
        const section = $(table).closest("section");
        section.classList.toggle("stale", error !== null);
        section.title = error ? "not updated: " + (error.message || error) : "";
      } else if (error) {
        statusError = error;
      }
    });
    if (statusError) throw statusError;
  }

  async function loop() {
    for (;;) {
      const started = Date.now();
      try {
        await refresh();
        markOnline();
      } catch (error) {
        markOffline(error);
      }
      await new Promise((resolve) => setTimeout(resolve, Math.max(0, POLL_MS - (Date.now() - started))));
    }
  }

  function proofLine(label, value) {
    const div = document.createElement("div");
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    if (value instanceof Node) dd.appendChild(value);
    else dd.textContent = String(value);
    div.append(dt, dd);
    return div;
  }

  async function lookupProof(event) {
    event.preventDefault();
    const out = $("proof-result");
    let leaf = $("proof-leaf").value.trim().toLowerCase();
    if (!leaf.startsWith("0x")) leaf = "0x" + leaf;
    if (!/^0x[0-9a-f]{64}$/.test(leaf)) {
      out.dataset.state = "error";
      out.textContent = "A leaf hash is 32 bytes: 64 hex digits, optionally prefixed with 0x.";
      return;
    }
    out.dataset.state = "loading";
    out.textContent = "Looking up…";
    try {
      const r = await getJson("api/proofs/" + leaf);
      if (!r.ok) {
        out.dataset.state = r.status === 404 ? "missing" : "error";
        out.textContent = (r.body && r.body.error) || `HTTP ${r.status}`;
        return;
      }
      const p = r.body;
      const verified = p.verified_on_chain;
      const verdict = document.createElement("p");
      verdict.id = "proof-verdict";
      verdict.dataset.testid = "proof-verdict";
      if (verified === true) {
        verdict.className = "verdict ok";
        verdict.textContent = "✔ verified on chain against the anchored root";
      } else if (verified === false) {
        verdict.className = "verdict bad";
        verdict.textContent = "✘ NOT verified: the chain rejects this proof";
      } else {
        verdict.className = "verdict warn";
        verdict.textContent = "? could not be checked on chain right now" +
          (p.verify_error ? ": " + p.verify_error : "");
      }
      const steps = document.createElement("ol");
      steps.className = "proof-steps";
      for (const node of p.proof || []) {
        const li = document.createElement("li");
        li.appendChild(code(node, 0, 0));
        steps.appendChild(li);
      }
      const details = document.createElement("dl");
      details.className = "proof-details";
      details.append(
        proofLine("Leaf", code(p.leaf, 0, 0)),
        proofLine("Batch", p.batch_id),
        proofLine("Root", code(p.root, 0, 0)),
        proofLine("Leaves in batch", p.leaf_count),
        proofLine("Proof", (p.proof || []).length ? steps : "(single-leaf batch: the leaf is the root)"),
      );
      out.dataset.state = verified === true ? "verified" : verified === false ? "unverified" : "unchecked";
      out.replaceChildren(verdict, details);
    } catch (error) {
      out.dataset.state = "error";
      out.textContent = "Lookup failed: " + (error && error.message ? error.message : error);
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    $("proof-form").addEventListener("submit", lookupProof);
    loop();
  });
})();

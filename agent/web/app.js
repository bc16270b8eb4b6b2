// recagent web chat: streams /v1/chat (SSE over fetch), renders recommendation cards as soon as they are ranked,
// updates each card's reason in place as the LLM writes it (a small tag says who wrote it), and a "why?" panel.
(function () {
  "use strict";
  const log = document.getElementById("log");
  const form = document.getElementById("composer");
  const input = document.getElementById("message");
  const send = document.getElementById("send");
  const userBox = document.getElementById("user-id");
  const keyBox = document.getElementById("api-key");
  const store = window.sessionStorage;
  let sessionId = store.getItem("recagent.session") || null;
  keyBox.value = window.localStorage.getItem("recagent.key") || "";
  keyBox.addEventListener("change", () => window.localStorage.setItem("recagent.key", keyBox.value));
  document.getElementById("new-chat").addEventListener("click", () => {
    sessionId = null; store.removeItem("recagent.session"); log.textContent = "";
  });

  function headers(extra) {
    const h = Object.assign({ "Content-Type": "application/json" }, extra || {});
    if (keyBox.value) h["Authorization"] = "Bearer " + keyBox.value;
    return h;
  }

  function bubble(kind, text) {
    const div = document.createElement("div");
    div.className = "msg " + kind;
    div.textContent = text || "";
    log.appendChild(div);
    log.scrollTop = log.scrollHeight;
    return div;
  }

  function errorText(body, status) {
    if (body && body.error) return body.error.message + (body.error.field ? " (" + body.error.field + ")" : "");
    return "request failed (HTTP " + status + ")";
  }

  const titles = {};
  async function itemTitle(id) {
    if (titles[id]) return titles[id];
    try {
      const r = await fetch("/v1/items/" + encodeURIComponent(id), { headers: headers() });
      if (r.ok) { titles[id] = (await r.json()).title; return titles[id]; }
    } catch (e) { /* fall through */ }
    return id;
  }

  const SOURCE_LABEL = { llm: "LLM", template: "template" };
  const SOURCE_TITLE = {
    llm: "written by the language model, checked against the catalogue",
    template: "composed from the catalogue metadata and your history",
  };

  // the "why?" panel: the item's reason, who wrote it, the liked items it rests on, the score
  async function fillPanel(item, panel) {
    const token = String((Number(panel.dataset.fill) || 0) + 1);
    panel.dataset.fill = token;
    const parts = [];
    const p = document.createElement("div");
    p.className = "why-reason";
    p.textContent = item.reason || "No reason was given for this pick.";
    parts.push(p);
    if (item.reason_source && SOURCE_TITLE[item.reason_source]) {
      const who = document.createElement("div");
      who.className = "why-source";
      who.textContent = SOURCE_TITLE[item.reason_source];
      parts.push(who);
    }
    if (item.evidence && item.evidence.length) {
      const head = document.createElement("div");
      head.textContent = "Because you liked:";
      const ul = document.createElement("ul");
      for (const id of item.evidence) {
        const li = document.createElement("li");
        li.textContent = await itemTitle(id);
        ul.appendChild(li);
      }
      parts.push(head, ul);
    }
    if (typeof item.score === "number") {
      const s = document.createElement("div");
      s.className = "score";
      s.textContent = "score " + item.score.toFixed(3);
      parts.push(s);
    }
    if (panel.dataset.fill !== token) return;  // a newer reason arrived while titles were fetched
    panel.replaceChildren(...parts);
  }

  function explain(entry) {
    const panel = entry.panel;
    if (!panel.hidden) { panel.hidden = true; return; }
    panel.hidden = false;
    fillPanel(entry.item, panel);
  }

  // the card's reason text and the small tag saying who wrote it
  function showReason(entry) {
    const item = entry.item;
    entry.card.querySelector(".reason").textContent = item.reason || "";
    const tag = entry.card.querySelector(".source");
    const source = item.reason_source;
    tag.hidden = !SOURCE_LABEL[source];
    tag.textContent = SOURCE_LABEL[source] || "";
    tag.title = SOURCE_TITLE[source] || "";
    tag.className = "source" + (source ? " " + source : "");
    entry.card.dataset.reasonSource = source || "";
    if (!entry.panel.hidden) fillPanel(item, entry.panel);
  }

  // cards of one turn: item id -> {item, card, panel}
  function renderCards(items) {
    const cards = {};
    if (!items || !items.length) return cards;
    const grid = document.createElement("div");
    grid.className = "cards";
    const tpl = document.getElementById("card-template");
    items.forEach((raw, i) => {
      const item = Object.assign({}, raw);
      const card = tpl.content.firstElementChild.cloneNode(true);
      card.dataset.itemId = item.item_id;
      card.querySelector(".rank").textContent = (i + 1) + ".";
      card.querySelector(".title").textContent = item.title;
      const meta = [item.year, (item.genres || []).join(", ")].filter(Boolean).join(" · ");
      card.querySelector(".meta").textContent = meta;
      const entry = { item: item, card: card, panel: card.querySelector(".why-panel") };
      card.querySelector(".why").addEventListener("click", () => explain(entry));
      showReason(entry);
      cards[item.item_id] = entry;
      grid.appendChild(card);
    });
    log.appendChild(grid);
    log.scrollTop = log.scrollHeight;
    return cards;
  }

  // a reason event (or the final answer's item): update that card in place
  function updateReason(cards, data) {
    const entry = cards[data.item_id];
    if (!entry) return;
    const item = entry.item;
    if (item.reason === data.reason && item.reason_source === data.reason_source &&
        JSON.stringify(item.evidence || []) === JSON.stringify(data.evidence || [])) return;
    item.reason = data.reason;
    item.evidence = data.evidence || [];
    item.reason_source = data.reason_source;
    showReason(entry);
  }

  function finish(bot, done, turn) {
    if (done.session_id) { sessionId = done.session_id; store.setItem("recagent.session", sessionId); }
    if (done.reply && !bot.textContent) bot.textContent = done.reply;
    if (done.degraded) {
      bot.classList.add("degraded");
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = "(degraded: " + (done.reason || "the language model is unavailable") + ")";
      bot.appendChild(note);
    }
    if (!turn.cards) turn.cards = renderCards(done.items);
    else for (const item of done.items || []) updateReason(turn.cards, item);
  }

  async function readEvents(response, onEvent) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        let event = "message"; const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) onEvent(event, JSON.parse(data.join("\n")));
      }
    }
  }

  async function ask(message) {
    bubble("user", message);
    const bot = bubble("bot", "");
    bot.classList.add("pending");
    const body = { message: message };
    if (sessionId) body.session_id = sessionId;
    if (userBox.value.trim()) body.user_id = userBox.value.trim();
    let response;
    try {
      response = await fetch("/v1/chat", { method: "POST", headers: headers({ Accept: "text/event-stream" }),
                                           body: JSON.stringify(body) });
    } catch (e) {
      bot.remove(); bubble("error", "cannot reach the server: " + e); return;
    }
    if (!response.ok) {
      let payload = null;
      try { payload = await response.json(); } catch (e) { /* not JSON */ }
      bot.remove();
      if (response.status === 404 && payload && payload.error && payload.error.field === "session_id") {
        sessionId = null; store.removeItem("recagent.session");
      }
      bubble("error", errorText(payload, response.status));
      return;
    }
    const turn = { cards: null };
    await readEvents(response, (event, data) => {
      if (event === "token") { bot.textContent += data.text; log.scrollTop = log.scrollHeight; }
      else if (event === "items") { if (!turn.cards) turn.cards = renderCards(data.items); }
      else if (event === "reason") { if (turn.cards) updateReason(turn.cards, data); }
      else if (event === "done") finish(bot, data, turn);
      else if (event === "error") bubble("error", errorText(data, 500));
    });
    bot.classList.remove("pending");
  }

  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const message = input.value.trim();
    if (!message) return;
    input.value = "";
    send.disabled = true;
    try { await ask(message); } finally { send.disabled = false; input.focus(); }
  });
})();

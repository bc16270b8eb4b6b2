// recagent web chat: streams /v1/chat (SSE over fetch), renders recommendation cards with reasons and a "why?".
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

  async function explain(item, panel) {
    if (!panel.hidden) { panel.hidden = true; return; }
    panel.hidden = false;
    panel.textContent = "";
    const p = document.createElement("div");
    p.textContent = item.reason || "No reason was given for this pick.";
    panel.appendChild(p);
    if (item.evidence && item.evidence.length) {
      const head = document.createElement("div");
      head.textContent = "Because you liked:";
      const ul = document.createElement("ul");
      panel.appendChild(head); panel.appendChild(ul);
      for (const id of item.evidence) {
        const li = document.createElement("li");
        li.textContent = await itemTitle(id);
        ul.appendChild(li);
      }
    }
    if (typeof item.score === "number") {
      const s = document.createElement("div");
      s.className = "score";
      s.textContent = "score " + item.score.toFixed(3);
      panel.appendChild(s);
    }
  }

  function renderCards(items) {
    if (!items || !items.length) return;
    const grid = document.createElement("div");
    grid.className = "cards";
    const tpl = document.getElementById("card-template");
    items.forEach((item, i) => {
      const card = tpl.content.firstElementChild.cloneNode(true);
      card.dataset.itemId = item.item_id;
      card.querySelector(".rank").textContent = (i + 1) + ".";
      card.querySelector(".title").textContent = item.title;
      const meta = [item.year, (item.genres || []).join(", ")].filter(Boolean).join(" · ");
      card.querySelector(".meta").textContent = meta;
      card.querySelector(".reason").textContent = item.reason || "";
      const panel = card.querySelector(".why-panel");
      card.querySelector(".why").addEventListener("click", () => explain(item, panel));
      grid.appendChild(card);
    });
    log.appendChild(grid);
    log.scrollTop = log.scrollHeight;
  }

  function finish(bot, done) {
    if (done.session_id) { sessionId = done.session_id; store.setItem("recagent.session", sessionId); }
    if (done.reply && !bot.textContent) bot.textContent = done.reply;
    if (done.degraded) {
      bot.classList.add("degraded");
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = "(degraded: " + (done.reason || "the language model is unavailable") + ")";
      bot.appendChild(note);
    }
    renderCards(done.items);
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
    await readEvents(response, (event, data) => {
      if (event === "token") { bot.textContent += data.text; log.scrollTop = log.scrollHeight; }
      else if (event === "done") finish(bot, data);
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

// The chat page: conversations of this browser, answers streamed from /api/chat/stream.
"use strict";

(() => {
  const { el, markdown, sseEvents } = Rom;
  const LIST_KEY = "rom.conversations"; // ids and titles only; the messages live on the server
  const ACTIVE_KEY = "rom.active";
  const API_KEY = "rom.apiKey"; // this tab only (sessionStorage), asked once

  const messages = document.getElementById("messages");
  const form = document.getElementById("composer");
  const input = document.getElementById("message");
  const send = document.getElementById("send");
  const list = document.getElementById("conversations");
  const sidebar = document.getElementById("sidebar");
  const toggle = document.getElementById("toggle-sidebar");
  let active = localStorage.getItem(ACTIVE_KEY);
  let busy = false;

  function conversations() {
    try { return JSON.parse(localStorage.getItem(LIST_KEY)) || []; } catch { return []; }
  }

  function remember(id, title) {
    const all = conversations().filter((c) => c.id !== id);
    const previous = conversations().find((c) => c.id === id);
    all.unshift({ id, title: previous ? previous.title : title.slice(0, 60), updatedAt: new Date().toISOString() });
    localStorage.setItem(LIST_KEY, JSON.stringify(all.slice(0, 100)));
    renderList();
  }

  function forget(id) {
    localStorage.setItem(LIST_KEY, JSON.stringify(conversations().filter((c) => c.id !== id)));
    renderList();
  }

  function setActive(id) {
    active = id;
    if (id) localStorage.setItem(ACTIVE_KEY, id); else localStorage.removeItem(ACTIVE_KEY);
    renderList();
  }

  function renderList() {
    list.replaceChildren(...conversations().map((c) =>
      el("li", {},
        el("button", {
          type: "button",
          class: c.id === active ? "conversation current" : "conversation",
          "aria-current": c.id === active ? "true" : null,
          "data-id": c.id,
          onclick: () => { open(c.id); sidebar.classList.remove("shown"); },
        }, c.title || c.id))));
  }

  function clearMessages() {
    messages.replaceChildren(el("p", { class: "empty", id: "empty" },
      "Faça uma pergunta para começar. As respostas aparecem enquanto são escritas."));
  }

  function bubble(role) {
    document.getElementById("empty")?.remove();
    const body = el("div", { class: "body" });
    const meta = el("div", { class: "meta" });
    const node = el("article", { class: "msg " + role }, body, meta);
    messages.append(node);
    return { node, body, meta };
  }

  function showText(target, text) {
    target.replaceChildren(markdown(text));
  }

  function describeMeta(meta, info) {
    const parts = [];
    if (info.model) parts.push("modelo: " + info.model);
    if (info.fallbackUsed) parts.push("fallback usado");
    if (info.continued || info.continuation || info.continuedBy) parts.push("resposta continuada por outro modelo");
    const tools = info.toolsUsed || [];
    if (tools.length) {
      const counts = {};
      for (const t of tools) { const name = typeof t === "string" ? t : t.name; counts[name] = (counts[name] || 0) + 1; }
      parts.push("ferramentas: " + Object.entries(counts).map(([n, c]) => (c > 1 ? `${n} ×${c}` : n)).join(", "));
    }
    meta.textContent = parts.join(" · ");
  }

  function errorText(status, body, retryAfter) {
    if (status === 503) {
      const wait = retryAfter ? ` Tente novamente em ${retryAfter} s.` : " Tente novamente em instantes.";
      return "Serviço temporariamente indisponível." + wait;
    }
    if (status === 401) return "Chave de acesso inválida.";
    if (status === 400 || status === 413) return "Pedido inválido: " + (body.error || status);
    if (status === 504) return "O tempo limite da resposta foi atingido. Tente novamente.";
    return "Não foi possível obter a resposta (" + (body.code || status) + ").";
  }

  function askKey() {
    return new Promise((resolve) => {
      const dialog = document.getElementById("key-dialog");
      const field = document.getElementById("api-key");
      field.value = "";
      dialog.addEventListener("close", () => {
        const key = field.value.trim();
        if (key) sessionStorage.setItem(API_KEY, key);
        resolve(Boolean(key));
      }, { once: true });
      dialog.showModal();
      field.focus();
    });
  }

  function headers() {
    const h = { "Content-Type": "application/json", Accept: "text/event-stream" };
    const key = sessionStorage.getItem(API_KEY);
    if (key) h.Authorization = "Bearer " + key;
    return h;
  }

  async function post(text) {
    const body = JSON.stringify(active ? { mensagem: text, conversationId: active } : { mensagem: text });
    let response = await fetch("/api/chat/stream", { method: "POST", headers: headers(), body });
    if (response.status === 401 && (await askKey())) {
      response = await fetch("/api/chat/stream", { method: "POST", headers: headers(), body });
    }
    return response;
  }

  async function ask(text) {
    busy = true;
    send.disabled = true;
    const user = bubble("user");
    showText(user.body, text);
    const answer = bubble("assistant streaming");
    answer.meta.textContent = "escrevendo…";
    let content = "";
    try {
      const response = await post(text);
      if (!response.ok) {
        let data = {};
        try { data = await response.json(); } catch { /* not JSON */ }
        answer.node.classList.add("failed");
        answer.body.textContent = errorText(response.status, data, response.headers.get("Retry-After"));
        answer.meta.textContent = data.code || String(response.status);
        return;
      }
      for await (const event of sseEvents(response)) {
        if (event.type === "connected") {
          setActive(event.conversationId);
          remember(event.conversationId, text);
        } else if (event.type === "chunk") {
          content += event.content;
          showText(answer.body, content);
          messages.scrollTop = messages.scrollHeight;
        } else if (event.type === "done") {
          content = event.content || content;
          showText(answer.body, content);
          describeMeta(answer.meta, event);
        } else if (event.type === "error") {
          answer.node.classList.add("failed");
          // Before any text: no answer at all; after some: a cut answer, never shown as complete.
          const lead = content ? "A resposta foi interrompida: " : "Não foi possível responder: ";
          answer.body.append(el("p", { class: "error" },
            lead + (event.error || event.code) + (event.recoverable ? " Tente novamente em instantes." : "")));
          answer.meta.textContent = event.code || "erro";
        }
      }
    } catch (error) {
      answer.node.classList.add("failed");
      answer.body.append(el("p", { class: "error" }, "Falha de conexão com o serviço. Tente novamente."));
    } finally {
      answer.node.classList.remove("streaming");
      busy = false;
      send.disabled = false;
      input.focus();
    }
  }

  async function open(id) {
    setActive(id);
    clearMessages();
    const h = headers();
    let response = await fetch("/api/conversations/" + encodeURIComponent(id), { headers: h });
    if (response.status === 401 && (await askKey())) {
      response = await fetch("/api/conversations/" + encodeURIComponent(id), { headers: headers() });
    }
    if (response.status === 404) { forget(id); setActive(null); return; }
    if (!response.ok) return;
    const data = await response.json();
    for (const message of data.messages) {
      const uses = (message.blocks || []).filter((b) => b.type === "toolUse");
      if (message.role === "user" && !message.content) continue; // tool results
      if (message.role === "assistant" && !message.content && uses.length) {
        const b = bubble("tool");
        b.body.textContent = "🔧 " + uses.map((u) => u.name).join(", ");
        continue;
      }
      const b = bubble(message.role === "user" ? "user" : "assistant");
      showText(b.body, message.content);
      if (message.role === "assistant") describeMeta(b.meta, { model: message.model });
    }
    messages.scrollTop = messages.scrollHeight;
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = input.value.trim();
    if (!text || busy) return;
    input.value = "";
    ask(text);
  });
  input.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      form.requestSubmit();
    }
  });
  document.getElementById("new-chat").addEventListener("click", () => {
    setActive(null);
    clearMessages();
    sidebar.classList.remove("shown");
    input.focus();
  });
  toggle.addEventListener("click", () => {
    const shown = sidebar.classList.toggle("shown");
    toggle.setAttribute("aria-expanded", String(shown));
  });

  renderList();
  if (active) open(active);
  input.focus();
})();

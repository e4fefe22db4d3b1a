// Shared by both pages. Everything is built with DOM nodes and textContent, never innerHTML,
// so text from the server or the model can never become markup.
"use strict";

const Rom = (() => {
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  // ------------------------------------------------------------------ safe Markdown
  // A small subset: headings, paragraphs, lists, block quotes, fenced code, **bold**,
  // *italic*, `code` and [links](https://…). Output is DOM nodes only.
  // (`_` is not emphasis: legal and technical text is full of identifiers like MODEL_CHAIN.)
  const INLINE = /(`[^`\n]+`)|(\*\*(?!\s)[^*\n]+?\*\*)|(\*(?!\s)[^*\n]+?\*)|(\[[^\]\n]+\]\([^)\s]+\))/;

  function inline(text) {
    const out = [];
    let rest = text;
    while (rest) {
      const match = INLINE.exec(rest);
      if (!match) { out.push(document.createTextNode(rest)); break; }
      if (match.index) out.push(document.createTextNode(rest.slice(0, match.index)));
      const token = match[0];
      if (match[1]) out.push(el("code", { text: token.slice(1, -1) }));
      else if (match[2]) out.push(el("strong", {}, inline(token.slice(2, -2))));
      else if (match[3]) out.push(el("em", {}, inline(token.slice(1, -1))));
      else {
        const split = token.indexOf("](");
        const label = token.slice(1, split);
        const href = token.slice(split + 2, -1);
        if (/^https?:\/\//i.test(href)) {
          out.push(el("a", { href, target: "_blank", rel: "noopener noreferrer" }, label));
        } else {
          out.push(document.createTextNode(token)); // javascript:, data:… stay plain text
        }
      }
      rest = rest.slice(match.index + token.length);
    }
    return out;
  }

  function markdown(source) {
    const root = document.createDocumentFragment();
    const lines = source.replace(/\r\n?/g, "\n").split("\n");
    let i = 0;
    while (i < lines.length) {
      const line = lines[i];
      if (/^\s*$/.test(line)) { i++; continue; }
      const fence = /^```(.*)$/.exec(line);
      if (fence) {
        const code = [];
        i++;
        while (i < lines.length && !/^```\s*$/.test(lines[i])) code.push(lines[i++]);
        i++;
        root.append(el("pre", {}, el("code", { text: code.join("\n") })));
        continue;
      }
      const heading = /^(#{1,4})\s+(.*)$/.exec(line);
      if (heading) {
        root.append(el("h" + (heading[1].length + 2), {}, inline(heading[2])));
        i++;
        continue;
      }
      const listKind = /^\s*([-*+]|\d+[.)])\s+/.exec(line);
      if (listKind) {
        const ordered = /\d/.test(listKind[1]);
        const list = el(ordered ? "ol" : "ul");
        const item = ordered ? /^\s*\d+[.)]\s+(.*)$/ : /^\s*[-*+]\s+(.*)$/;
        let m;
        while (i < lines.length && (m = item.exec(lines[i]))) {
          list.append(el("li", {}, inline(m[1])));
          i++;
        }
        root.append(list);
        continue;
      }
      if (/^>\s?/.test(line)) {
        const quoted = [];
        while (i < lines.length && /^>\s?/.test(lines[i])) quoted.push(lines[i++].replace(/^>\s?/, ""));
        root.append(el("blockquote", {}, markdown(quoted.join("\n"))));
        continue;
      }
      const para = [];
      while (i < lines.length && !/^\s*$/.test(lines[i]) && !/^(```|#{1,4}\s|>|\s*([-*+]|\d+[.)])\s)/.test(lines[i])) {
        para.push(lines[i++]);
      }
      const p = el("p");
      para.forEach((text, index) => {
        if (index) p.append(el("br"));
        p.append(...inline(text));
      });
      root.append(p);
    }
    return root;
  }

  // ------------------------------------------------------------------ SSE over fetch
  // EventSource is GET-only; the chat stream is a POST, so parse `data:` events by hand.
  async function* sseEvents(response) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
        if (data && data !== "[DONE]") yield JSON.parse(data);
      }
    }
  }

  function duration(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    const s = Math.max(0, Math.round(seconds));
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function clock(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toLocaleTimeString();
  }

  return { el, markdown, sseEvents, duration, clock };
})();

// The page's script: it talks to `distill serve` through the OpenAI API like any client.
// Each column is one model's conversation: the whole conversation so far (the user's turns
// and that model's own answers) is sent as `messages` on every turn, streamed back as
// server-sent events. A model answered WITH a system prompt (the teacher) gets the one
// /page/system_prompts names, first; a student gets none, as it was trained.
"use strict";

const TOKEN_KEY = "promptdistill.token";  // sessionStorage: this tab only, gone when it closes
const $ = (id) => document.getElementById(id);

const state = {
  models: [],     // ids from /v1/models
  prompts: {},    // model id -> the system prompt the page sends it
  columns: [],    // {model, history: [{role, content}], turns: <ol>}
  busy: false,
};

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function plural(n, word) { return `${n} ${word}${n === 1 ? "" : "s"}`; }

function setStatus(text) { $("status").textContent = text; }

function askForToken(message) {
  $("token-message").textContent = message;
  $("token-panel").hidden = false;
  $("send").disabled = true;
  setStatus("Not connected");
  $("token").focus();
}

class Unauthorized extends Error {}

async function getJSON(path) {
  const res = await fetch(path, { headers: authHeaders() });
  if (res.status === 401) throw new Unauthorized();
  if (!res.ok) throw new Error(`${path} answered ${res.status}`);
  return res.json();
}

function tokenMessage() {
  return sessionStorage.getItem(TOKEN_KEY)
    ? "The server refused this token. Enter the bearer token it was started with (the value of the variable named by distill serve --token-env)."
    : "This server needs a bearer token: the value of the variable named by distill serve --token-env. It is kept in this tab only.";
}

async function connect() {
  try {
    const [models, prompts] = [await getJSON("/v1/models"), await getJSON("/page/system_prompts")];
    state.models = models.data.map((m) => m.id);
    state.prompts = prompts;
  } catch (e) {
    if (e instanceof Unauthorized) askForToken(tokenMessage());
    else setStatus(`Cannot reach the server: ${e.message}`);
    return;
  }
  $("token-panel").hidden = true;
  const select = $("model"), previous = select.value;
  select.replaceChildren(...state.models.map(
    (id) => new Option(state.prompts[id] !== undefined ? `${id} (prompted)` : id, id)));
  // The model chosen before a reconnect, else a student first: that is who the page is for.
  select.value = state.models.includes(previous) ? previous
    : state.models.find((id) => state.prompts[id] === undefined) ?? state.models[0];
  $("beside-label").hidden = !teacherModel();
  for (const id of ["model", "new-chat"]) $(id).disabled = false;
  // A token given again in the middle of a chat: the chat goes on.
  if (state.columns.length && shownModels().join() === state.columns.map((c) => c.model).join()) {
    $("send").disabled = state.busy;
    setStatus("Connected");
  } else {
    newChat();
  }
}

// The teacher beside a student: its own run's ("<run>-student" -> "<run>-teacher", prompted with
// that run's system prompt), else the first prompted model served.
function teacherModel(chosen = $("model").value) {
  const own = chosen.replace(/-student$/, "-teacher");
  return state.prompts[own] !== undefined ? own : state.models.find((id) => state.prompts[id] !== undefined);
}

function shownModels() {
  const chosen = $("model").value, teacher = teacherModel();
  return teacher && $("beside").checked && teacher !== chosen ? [chosen, teacher] : [chosen];
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  node.append(...children);
  return node;
}

function newChat() {
  state.columns = shownModels().map((model) => {
    const prompt = state.prompts[model];
    const turns = el("ol", { class: "turns" });
    const section = el("section", { class: `column ${prompt === undefined ? "student" : "teacher"}`, "data-model": model },
      el("h2", {}, model, el("span", { class: "role" },
        prompt === undefined ? "no system prompt" : "answers WITH the run's system prompt")));
    if (prompt !== undefined) section.append(el("details", {}, el("summary", {}, "system prompt"), el("pre", {}, prompt)));
    section.append(turns, el("p", { class: "empty" }, "No messages yet."));
    return { model, history: [], turns, section };
  });
  $("columns").replaceChildren(...state.columns.map((c) => c.section));
  $("send").disabled = state.busy;
  setStatus(`New chat with ${state.columns.map((c) => c.model).join(" and ")}`);
  $("input").focus();
}

// One turn of one column: POST the whole conversation, stream the answer into the page.
// False when it failed (the error shown in place of the answer).
async function answer(column, text) {
  column.section.querySelector(".empty")?.remove();
  const reply = el("div", { class: "msg assistant streaming" });
  const meta = el("div", { class: "meta" }, "waiting…");
  column.turns.append(el("li", { class: "turn" }, el("div", { class: "msg user" }, text), reply, meta));
  reply.scrollIntoView({ block: "end" });
  column.history.push({ role: "user", content: text });
  const system = state.prompts[column.model];
  const messages = system === undefined ? column.history : [{ role: "system", content: system }, ...column.history];
  const seed = $("seed").value.trim();  // blank: the server draws one
  const started = performance.now();
  let firstToken = null, usage = null, failure = null;
  try {
    const res = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json", ...authHeaders() },
      body: JSON.stringify({
        model: column.model, messages, stream: true, stream_options: { include_usage: true },
        ...(seed === "" ? {} : { seed: Number(seed) }),
      }),
    });
    if (res.status === 401) {
      askForToken(tokenMessage());
      throw new Error("the server refused the bearer token");
    }
    if (!res.ok) throw new Error((await res.json().catch(() => null))?.error?.message ?? `HTTP ${res.status}`);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const delta = chunk.choices?.[0]?.delta?.content;
        if (delta) {
          firstToken ??= performance.now() - started;
          reply.textContent += delta;
        }
      }
    }
  } catch (e) {
    failure = e.message;
  }
  reply.classList.remove("streaming");
  if (failure !== null) {
    column.history.pop();  // the turn was not answered: the next one must not follow an unanswered turn
    reply.classList.add("error");
    reply.textContent += `${reply.textContent ? "\n" : ""}Error: ${failure}`;
    meta.textContent = "not kept in the conversation";
    return false;
  }
  column.history.push({ role: "assistant", content: reply.textContent });
  const seconds = (performance.now() - started) / 1000;
  meta.dataset.promptTokens = usage?.prompt_tokens ?? "";
  meta.dataset.firstTokenMs = firstToken === null ? "" : Math.round(firstToken);
  meta.textContent = [
    usage ? `read ${plural(usage.prompt_tokens, "token")}` : "tokens read: not reported",
    firstToken === null ? "no text" : `first token ${(firstToken / 1000).toFixed(2)} s`,
    usage ? `wrote ${plural(usage.completion_tokens, "token")} in ${seconds.toFixed(2)} s` : `${seconds.toFixed(2)} s`,
  ].join(" · ");
  return true;
}

async function send(event) {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.busy || !state.columns.length) return;
  $("input").value = "";
  state.busy = true;
  for (const id of ["send", "model", "beside", "new-chat"]) $(id).disabled = true;
  setStatus("Answering…");
  const answered = await Promise.all(state.columns.map((column) => answer(column, text)));
  if (answered.includes(false) && !$("input").value) $("input").value = text;  // to send again, not type again
  state.busy = false;
  for (const id of ["model", "beside", "new-chat"]) $(id).disabled = false;
  $("send").disabled = !$("token-panel").hidden;
  setStatus(`${plural(state.columns[0].history.filter((m) => m.role === "user").length, "turn")} with ${state.columns.map((c) => c.model).join(" and ")}`);
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", send);
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    connect();
  });
  // Another model, or the teacher shown or hidden: the conversations so far were with other models.
  $("model").addEventListener("change", newChat);
  $("beside").addEventListener("change", newChat);
  $("new-chat").addEventListener("click", newChat);
  connect();
});

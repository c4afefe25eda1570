// The vlm page: upload an image, show its caption token by token, and each token's map over the image.
"use strict";

const $ = (id) => document.getElementById(id);
const TOKEN_DELAY_MS = 60;  // the returned tokens appear one after another

const state = {
  file: null,        // the uploaded File
  requests: { caption: 0, answer: 0 },  // newest request id per kind; older replies are dropped
  image: null,       // data URI of the plain image
  sets: {},          // "caption" | "answer" -> {tokens, overlays}
  active: null,      // the set the slider steps through
  index: -1,         // selected token in the active set, -1: image only
};

async function post(path, fields) {
  const form = new FormData();
  for (const [key, value] of Object.entries(fields)) {
    if (value !== null && value !== undefined) form.append(key, value);
  }
  const res = await fetch(path, { method: "POST", body: form });
  const body = await res.json().catch(() => ({ error: `HTTP ${res.status}` }));
  if (!res.ok) throw new Error(body.error || `HTTP ${res.status}`);
  return body;
}

function showError(message) {
  $("error").textContent = message || "";
  $("error").hidden = !message;
}

function select(kind, index) {
  const set = state.sets[kind];
  state.active = kind;
  state.index = set && index >= 0 && index < set.tokens.length ? index : -1;
  document.querySelectorAll(".token.selected").forEach((el) => el.classList.remove("selected"));
  if (state.index < 0) {
    $("view").src = state.image;
    $("view-label").textContent = "image";
  } else {
    $("view").src = set.overlays[state.index];
    $("view-label").textContent = `${kind} token ${state.index + 1}/${set.tokens.length}: ${set.tokens[state.index]}`;
    $(kind).children[state.index].classList.add("selected");
  }
  $("slider").max = set ? Math.max(set.tokens.length - 1, 0) : 0;
  $("slider").value = Math.max(state.index, 0);
}

function step(delta) {
  const set = state.sets[state.active];
  if (!set || !set.tokens.length) return;
  select(state.active, Math.min(Math.max(state.index + delta, 0), set.tokens.length - 1));
}

async function showTokens(kind, result, id) {
  const box = $(kind);
  box.replaceChildren();
  state.sets[kind] = { tokens: result.tokens, overlays: result.overlays };
  for (let i = 0; i < result.tokens.length; i++) {
    await new Promise((resolve) => setTimeout(resolve, TOKEN_DELAY_MS));
    if (id !== state.requests[kind]) return;
    const span = document.createElement("span");
    span.className = "token";
    span.textContent = result.tokens[i];
    span.title = "show where the model looked for this word";
    span.addEventListener("click", () => select(kind, i));
    box.appendChild(span);
  }
  box.dataset.state = result.tokens.length ? "done" : "empty-result";
  if (!result.tokens.length) box.textContent = "(no tokens)";
}

async function attend(kind, question) {
  if (!state.file) return;
  const id = ++state.requests[kind];
  const box = $(kind);
  box.replaceChildren();
  box.dataset.state = "loading";
  showError("");
  try {
    const result = await post("api/attend", { image: state.file, question, method: $("method").value });
    if (id !== state.requests[kind]) return;
    state.image = result.image;
    if (state.active === null || state.index < 0) $("view").src = result.image;
    await showTokens(kind, result, id);
  } catch (err) {
    if (id !== state.requests[kind]) return;
    box.dataset.state = "error";
    showError(err.message);
  }
}

async function upload(file) {
  if (!file) return;
  state.file = file;
  state.sets = {};
  state.active = null;
  state.index = -1;
  state.requests.answer++;
  $("viewer").hidden = false;
  $("answer").replaceChildren();
  $("answer").dataset.state = "empty";
  $("view").src = URL.createObjectURL(file);
  $("view-label").textContent = "image";
  await attend("caption", null);
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question) return showError("type a question first");
  await attend("answer", question);
}

async function loadMethods() {
  const res = await fetch("api/methods");
  const body = await res.json();
  for (const name of body.methods) {
    const option = document.createElement("option");
    option.value = option.textContent = name;
    $("method").appendChild(option);
  }
  $("method").value = body.default;
}

function setup() {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => upload(e.target.files[0]));
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    upload(e.dataTransfer.files[0]);
  });
  $("ask-form").addEventListener("submit", ask);
  $("slider").addEventListener("input", (e) => select(state.active || "caption", Number(e.target.value)));
  $("prev").addEventListener("click", () => step(-1));
  $("next").addEventListener("click", () => step(1));
  $("plain").addEventListener("click", () => select(state.active, -1));
  $("method").addEventListener("change", async () => {
    const question = state.sets.answer ? $("question").value.trim() : null;
    await attend("caption", null);
    if (question) await attend("answer", question);
  });
  document.addEventListener("keydown", (e) => {
    if (e.target.tagName === "INPUT" || e.target.tagName === "SELECT") return;
    if (e.key === "ArrowLeft") step(-1);
    if (e.key === "ArrowRight") step(1);
  });
  loadMethods().catch((err) => showError(`cannot list map methods: ${err.message}`));
}

setup();

// vlchat web UI: plain JavaScript over the server's own HTTP API (/v1/conversations...), so the
// page uses exactly the serving layer every other client uses. No build step, no network access.
"use strict";

const $ = (selector) => document.querySelector(selector);
const state = {
  conversationId: null,   // null until the first message of a new chat
  attachments: [],        // [{dataUrl, name}] for the next user message
  controller: null,       // AbortController of the answer being streamed
  config: null,           // /ui/config: model id, personas, examples
  apiKey: localStorage.getItem("vlchat.apiKey") || "",
};

// --- HTTP ------------------------------------------------------------------------------------
async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";
  if (state.apiKey) headers["Authorization"] = `Bearer ${state.apiKey}`;
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401 && askForKey()) return api(path, options);
  if (!response.ok) throw new Error(await errorMessage(response));
  return response;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return (body.error && body.error.message) || `HTTP ${response.status}`;
  } catch {
    return `HTTP ${response.status} ${response.statusText}`;
  }
}

function askForKey() {
  const key = window.prompt("This server needs an API key:");
  if (!key) return false;
  state.apiKey = key.trim();
  localStorage.setItem("vlchat.apiKey", state.apiKey);
  return true;
}

const json = (path, options) => api(path, options).then((r) => r.json());

// --- errors ----------------------------------------------------------------------------------
function showError(message) {
  const box = $("#error");
  box.textContent = message;
  box.hidden = false;
}

function clearError() {
  $("#error").hidden = true;
  $("#error").textContent = "";
}

// --- rendering -------------------------------------------------------------------------------
function addMessage(role, parts) {
  $("#empty-hint").hidden = true;
  const bubble = document.createElement("div");
  bubble.className = `message ${role}`;
  const labels = { user: "You", assistant: "vlchat", tool: "Tool result" };
  bubble.setAttribute("aria-label", labels[role] || "System");
  for (const part of parts) {
    if (part.type === "image") bubble.appendChild(storedImage(part.key));
    else if (part.type === "image_url") bubble.appendChild(imageElement(part.image_url.url, "your image"));
    else if (part.type === "tool_call") bubble.appendChild(toolBox("tool-call", `calls ${part.name}`, part.arguments));
    else if (part.type === "tool_result") {
      const box = toolBox("tool-result", `result of ${part.name || part.tool_call_id || "a tool"}`, part.content);
      for (const image of part.images || []) box.appendChild(storedImage(image.key));  // e.g. zoom's crop
      bubble.appendChild(box);
    } else bubble.appendChild(document.createTextNode(part.text));
  }
  $("#messages").appendChild(bubble);
  bubble.scrollIntoView({ block: "end" });
  return bubble;
}

// A tool call (name + JSON arguments) or a tool's result, as a collapsible labelled block (click the
// label to fold it; textContent: never HTML).
function toolBox(kind, label, body) {
  const box = document.createElement("details");
  box.className = kind;
  box.open = true;
  const title = document.createElement("summary");
  title.className = "tool-label";
  title.textContent = label;
  const code = document.createElement("code");
  code.textContent = body;
  box.append(title, code);
  return box;
}

// A call or a result of the server's tools as it streams in (a `vlchat_step` chunk).
function addStep(bubble, step) {
  const box = step.type === "tool_call"
    ? toolBox("tool-call", `calls ${step.name}`, step.arguments)
    : toolBox("tool-result", `result of ${step.tool}${step.ok ? "" : " (failed)"}`, step.content);
  if (step.type === "observation" && !step.ok) box.classList.add("failed");
  bubble.appendChild(box);
  bubble.scrollIntoView({ block: "end" });
}

function appendText(bubble, text) {  // the answer's words go after any call boxes
  if (bubble.lastChild && bubble.lastChild.nodeType === Node.TEXT_NODE) bubble.lastChild.appendData(text);
  else bubble.appendChild(document.createTextNode(text));
}

function imageElement(src, alt) {
  const img = document.createElement("img");
  img.src = src;
  img.alt = alt;
  return img;
}

function storedImage(key) {
  const img = imageElement("", "image in this conversation");
  api(`/v1/images/${key}`).then((r) => r.blob()).then((blob) => { img.src = URL.createObjectURL(blob); })
    .catch(() => { img.alt = "image (missing)"; });
  return img;
}

function renderConversation(conversation) {
  $("#messages").querySelectorAll(".message").forEach((el) => el.remove());
  $("#empty-hint").hidden = conversation.messages.length > 0;
  for (const message of conversation.messages) {
    const results = message.parts.length > 0 && message.parts.every((part) => part.type === "tool_result");
    addMessage(results ? "tool" : message.role, message.parts);
  }
}

async function refreshSidebar() {
  const list = $("#conversations");
  const { data } = await json("/v1/conversations?limit=100");
  list.replaceChildren(...data.map(conversationItem));
}

function conversationItem(conversation) {
  const item = document.createElement("li");
  item.className = conversation.id === state.conversationId ? "current" : "";
  const open = document.createElement("button");
  open.type = "button";
  open.className = "open";
  open.textContent = conversation.title;
  open.title = conversation.title;
  open.addEventListener("click", () => openConversation(conversation.id));
  const remove = document.createElement("button");
  remove.type = "button";
  remove.textContent = "×";
  remove.setAttribute("aria-label", `Delete “${conversation.title}”`);
  remove.addEventListener("click", () => deleteConversation(conversation.id));
  item.append(open, remove);
  return item;
}

// --- conversations ---------------------------------------------------------------------------
async function openConversation(id) {
  clearError();
  try {
    const conversation = await json(`/v1/conversations/${id}`);
    state.conversationId = id;
    localStorage.setItem("vlchat.conversation", id);
    $("#system").value = conversation.system ?? "";
    $("#persona").value = personaOf(conversation.system);
    renderConversation(conversation);
    $("#sidebar").classList.remove("open");
    await refreshSidebar();
  } catch (error) {
    if (localStorage.getItem("vlchat.conversation") === id) localStorage.removeItem("vlchat.conversation");
    showError(error.message);
  }
}

async function deleteConversation(id) {
  try {
    await api(`/v1/conversations/${id}`, { method: "DELETE" });
    if (id === state.conversationId) restart();
    await refreshSidebar();
  } catch (error) {
    showError(error.message);
  }
}

function restart() {  // MiniGPT-4's "Restart": a fresh conversation (the old one stays listed)
  stop();
  state.conversationId = null;
  state.attachments = [];
  localStorage.removeItem("vlchat.conversation");
  renderAttachments();
  renderConversation({ messages: [] });
  clearError();
  refreshSidebar().catch((error) => showError(error.message));
  $("#question").focus();
}

async function ensureConversation() {
  if (state.conversationId) return state.conversationId;
  const system = $("#system").value;
  const created = await json("/v1/conversations", {
    method: "POST", body: JSON.stringify({ system: system === "" && $("#persona").value === "default" ? null : system }),
  });
  state.conversationId = created.id;
  localStorage.setItem("vlchat.conversation", created.id);
  return created.id;
}

// --- asking and streaming ----------------------------------------------------------------------
function generationSettings() {
  const settings = {
    num_beams: Number($("#num-beams").value), temperature: Number($("#temperature").value),
    top_p: Number($("#top-p").value), max_tokens: Number($("#max-tokens").value),
    min_tokens: Math.min(Number($("#min-tokens").value), Number($("#max-tokens").value)),
  };
  if ($("#tools").checked && state.config.agent_tools.length) {  // server-side tools (a vlchat extension)
    settings.vlchat_tools = state.config.agent_tools;
    settings.vlchat_tool_choice = $("#tool-choice").value;
    settings.num_beams = 1;  // beam search cannot be combined with tools
  }
  return settings;
}

async function send(event) {
  event?.preventDefault();
  if (state.controller) return;
  const text = $("#question").value.trim();
  if (!text && state.attachments.length === 0) return;
  const content = [
    ...state.attachments.map((a) => ({ type: "image_url", image_url: { url: a.dataUrl } })),
    ...(text ? [{ type: "text", text }] : []),
  ];
  clearError();
  const bubble = addMessage("user", content);
  const isNew = state.conversationId === null;
  let answered = false;
  try {
    const id = await ensureConversation();
    answered = await streamAnswer(id, { content, ...generationSettings() });
  } catch (error) {
    showError(error.message);
  }
  if (answered) {
    $("#question").value = "";
    state.attachments = [];
    renderAttachments();
  } else {
    bubble.remove();  // refused (bad image, too long, busy): the text and images stay to fix and resend
    if (isNew && state.conversationId) await discardEmpty(state.conversationId);
  }
  refreshSidebar().catch(() => {});
}

async function discardEmpty(id) {  // a new chat whose first message was refused leaves no trace
  await api(`/v1/conversations/${id}`, { method: "DELETE" }).catch(() => {});
  state.conversationId = null;
  localStorage.removeItem("vlchat.conversation");
}

async function regenerate() {
  if (state.controller || !state.conversationId) return;
  const answers = $("#messages").querySelectorAll(".message.assistant");
  clearError();
  const last = answers[answers.length - 1];
  const lastIsAnswer = last && last === $("#messages").lastElementChild;
  if (lastIsAnswer) last.remove();
  await streamAnswer(state.conversationId, { regenerate: true, ...generationSettings() });
}

// POSTs a reply and streams the answer into a new bubble; false if the server refused it.
async function streamAnswer(id, body) {
  state.controller = new AbortController();
  setBusy(true);
  let bubble = null;
  try {
    const response = await api(`/v1/conversations/${id}/messages`, {
      method: "POST", body: JSON.stringify({ ...body, stream: true }), signal: state.controller.signal,
    });
    bubble = addMessage("assistant", []);
    bubble.classList.add("streaming");
    let steps = 0;
    await readEvents(response, (event) => {
      if (event.error) throw new Error(event.error.message);
      if (event.vlchat_step) {
        steps += 1;
        addStep(bubble, event.vlchat_step);
      }
      const delta = event.choices?.[0]?.delta?.content;
      if (delta) {
        appendText(bubble, delta);
        bubble.scrollIntoView({ block: "end" });
      }
    });
    if (steps) renderConversation(await json(`/v1/conversations/${id}`));  // as stored: results in turns of their own
    return true;
  } catch (error) {
    if (error.name === "AbortError") return true;  // stopped: the partial answer is kept
    showError(error.message);
    return bubble !== null;
  } finally {
    bubble?.classList.remove("streaming");
    state.controller = null;
    setBusy(false);
  }
}

async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
    }
  }
}

function stop() {
  state.controller?.abort();
}

function setBusy(busy) {
  $("#send").disabled = busy;
  $("#regenerate").disabled = busy;
  $("#stop").disabled = !busy;
}

// --- images ------------------------------------------------------------------------------------
function attachFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/") && file.type !== "") {
      showError(`${file.name} is not an image`);
      continue;
    }
    const reader = new FileReader();
    reader.onload = () => {
      state.attachments.push({ dataUrl: reader.result, name: file.name });
      renderAttachments();
    };
    reader.readAsDataURL(file);
  }
}

async function attachExample(example) {
  const blob = await (await fetch(example.url)).blob();
  attachFiles([new File([blob], example.name, { type: blob.type })]);
}

function renderAttachments() {
  const box = $("#attachments");
  box.replaceChildren(...state.attachments.map((attachment, index) => {
    const holder = document.createElement("span");
    holder.className = "attachment";
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "×";
    remove.setAttribute("aria-label", `Remove ${attachment.name}`);
    remove.addEventListener("click", () => { state.attachments.splice(index, 1); renderAttachments(); });
    holder.append(imageElement(attachment.dataUrl, attachment.name), remove);
    return holder;
  }));
}

// --- export ------------------------------------------------------------------------------------
async function exportConversation(format) {
  if (!state.conversationId) return showError("nothing to export yet: start a conversation first");
  try {
    const response = await api(`/v1/conversations/${state.conversationId}/export?format=${format}`);
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = `${state.conversationId}.${format === "json" ? "json" : "md"}`;
    link.click();
  } catch (error) {
    showError(error.message);
  }
}

// --- settings ----------------------------------------------------------------------------------
function personaOf(system) {
  if (system === null || system === undefined) return "default";
  if (system === "") return "none";
  const found = Object.entries(state.config.personas).find(([, text]) => text === system);
  return found ? found[0] : "custom";
}

function setUpSettings() {
  const select = $("#persona");
  const names = { default: "Template default", none: "No system prompt", custom: "Custom",
                  assistant: "Vision assistant", zhubajie: "Zhu Bajie 猪八戒 (role-play)", chinese: "中文助手 (Chinese)" };
  const options = ["default", ...Object.keys(state.config.personas), "none", "custom"];
  select.replaceChildren(...options.map((name) => new Option(names[name] || name, name)));
  select.addEventListener("change", () => {
    const name = select.value;
    if (name in state.config.personas) $("#system").value = state.config.personas[name];
    else if (name !== "custom") $("#system").value = "";
    saveSystem();
  });
  $("#system").addEventListener("input", () => { select.value = personaOf($("#system").value); });
  $("#system").addEventListener("change", saveSystem);
  setUpTools();
  for (const id of ["num-beams", "temperature", "top-p", "max-tokens", "min-tokens"]) {
    const input = $(`#${id}`);
    input.addEventListener("input", () => { $(`#${id}-value`).value = input.value; });
  }
}

function setUpTools() {  // the server's own tools: on by default for the default model
  const tools = state.config.agent_tools || [];
  $("#tools-settings").hidden = tools.length === 0;
  $("#tools").checked = Boolean(state.config.tools_on);
  $("#tool-names").textContent = `(${tools.join(", ")})`;
  const choices = { auto: "Model decides", required: "Always call a tool" };
  $("#tool-choice").replaceChildren(
    ...["auto", "required", ...tools].map((name) => new Option(choices[name] || `Call ${name}`, name)));
}

function saveSystem() {  // the system prompt of an open conversation follows the box
  if (!state.conversationId) return;
  const system = $("#persona").value === "default" ? null : $("#system").value;
  api(`/v1/conversations/${state.conversationId}`, { method: "PATCH", body: JSON.stringify({ system }) })
    .catch((error) => showError(error.message));
}

function setUpExamples() {
  $("#examples").replaceChildren(...state.config.examples.map((example) => {
    const button = document.createElement("button");
    button.type = "button";
    button.title = `Use example image ${example.name}`;
    button.setAttribute("aria-label", `Use example image ${example.name}`);
    button.appendChild(imageElement(example.url, example.name));
    button.addEventListener("click", () => attachExample(example));
    return button;
  }));
}

// --- wiring ------------------------------------------------------------------------------------
function setUpEvents() {
  $("#ask-form").addEventListener("submit", send);
  $("#question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) send(event);
  });
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") stop(); });
  $("#stop").addEventListener("click", stop);
  $("#regenerate").addEventListener("click", regenerate);
  $("#restart").addEventListener("click", restart);
  $("#new-chat").addEventListener("click", restart);
  $("#add-image").addEventListener("click", () => $("#image-input").click());
  $("#image-input").addEventListener("change", (event) => { attachFiles(event.target.files); event.target.value = ""; });
  $("#export-md").addEventListener("click", () => exportConversation("markdown"));
  $("#export-json").addEventListener("click", () => exportConversation("json"));
  $("#toggle-sidebar").addEventListener("click", () => {
    const open = $("#sidebar").classList.toggle("open");
    $("#toggle-sidebar").setAttribute("aria-expanded", String(open));
  });
  document.addEventListener("paste", (event) => attachFiles([...event.clipboardData.files]));
  document.addEventListener("dragover", (event) => { event.preventDefault(); $("#app").classList.add("dragging"); });
  document.addEventListener("dragleave", () => $("#app").classList.remove("dragging"));
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    $("#app").classList.remove("dragging");
    attachFiles([...event.dataTransfer.files]);
  });
}

async function start() {
  setUpEvents();
  try {
    state.config = await (await fetch("/ui/config")).json();
    $("#model-name").textContent = state.config.model;
    setUpSettings();
    setUpExamples();
    await refreshSidebar();
    const last = localStorage.getItem("vlchat.conversation");
    if (last) await openConversation(last);
  } catch (error) {
    showError(error.message);
  }
  document.body.dataset.ready = "true";
}

start();

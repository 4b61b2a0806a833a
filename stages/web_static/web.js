// The page of `python -m stages.web`: one session with the server, its conversation about one image, each
// answer's phrases coloured as their masks; hovering over a phrase shows its attention map, a click keeps it.
// Text from the model or the user is only ever set as textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const MAP_HINT = $("map-caption").textContent;
const state = {session: null, header: "X-Session", maxBytes: Infinity, busy: false, image: null, turns: 0,
               selected: null};

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function setBusy(busy) {
  state.busy = busy;
  document.body.dataset.busy = busy ? "1" : "";
  $("question").disabled = !state.image;
  $("send").disabled = busy || !state.image;
  $("stop").disabled = !busy;
  $("reset").disabled = busy || !state.image;
  $("save").disabled = busy || state.turns === 0;
  $("file").disabled = busy;
  for (const button of $("examples").querySelectorAll("button")) button.disabled = busy;
}

// POST to the API with the session's header; the parsed JSON, or an Error with the server's message.
async function call(path, {body = null, type = "application/json"} = {}) {
  const response = await fetch(path, {method: "POST", body, headers: {"Content-Type": type,
                                                                      [state.header]: state.session}});
  return parse(response, path);
}

async function parse(response, path) {
  let answer = null;
  try {
    answer = await response.json();
  } catch (error) {
    throw new Error(`${path}: HTTP ${response.status} ${response.statusText}`);
  }
  if (!response.ok || answer.error) throw new Error(answer.error || `${path}: HTTP ${response.status}`);
  return answer;
}

// Run `request` (a promise of an image description) while busy; show the image, or the error.
async function setImage(request) {
  showError("");
  setBusy(true);
  try {
    const image = await request();
    state.image = image;
    state.turns = 0;
    state.selected = null;
    $("log").replaceChildren();
    $("download").hidden = true;
    $("image-name").textContent = image.name;
    showPicture(image.image, `${image.name}: ${image.width} x ${image.height} pixels. Ask about it.`);
    clearMap();
  } catch (error) {
    showError(error.message);
  } finally {
    setBusy(false);
  }
}

function showPicture(url, caption) {
  $("overlay").src = url;
  $("overlay-caption").textContent = caption;
}

function clearMap() {
  $("map").removeAttribute("src");
  $("map-caption").textContent = MAP_HINT;
}

function point(phrase) {
  return phrase.point ? `(${Math.round(phrase.point[0])}, ${Math.round(phrase.point[1])})` : "none";
}

function showMap(turn, phrase) {
  if (!phrase.map) return;
  $("map").src = phrase.map;
  $("map").dataset.phrase = String(phrase.index);
  $("map-caption").textContent = `"${phrase.text}" (turn ${turn.index + 1}): where the model looked when it ` +
    `said it; the dot is the attention peak, ${point(phrase)}, SAM's prompt`;
}

function showOverlay(turn) {
  showPicture(turn.overlay, `Turn ${turn.index + 1}: each phrase's mask in the phrase's colour; the dots are ` +
    "the attention peaks that prompted SAM.");
}

function select(turn, phrase, span) {
  for (const other of document.querySelectorAll(".phrase.selected")) other.classList.remove("selected");
  span.classList.add("selected");
  state.selected = {turn, phrase};
  showOverlay(turn);
  showMap(turn, phrase);
}

function restoreSelection() {
  if (state.selected) showMap(state.selected.turn, state.selected.phrase);
}

// The answer with each phrase a coloured span that shows its attention map.
function renderAnswer(element, turn) {
  element.replaceChildren();
  element.classList.remove("streaming");
  let at = 0;
  let first = null;
  const phrases = turn.phrases.filter((p) => p.start !== null && p.end !== null).sort((a, b) => a.start - b.start);
  for (const phrase of phrases) {
    if (phrase.start < at) continue;
    element.append(turn.answer.slice(at, phrase.start));
    const span = document.createElement("span");
    span.className = "phrase";
    span.textContent = turn.answer.slice(phrase.start, phrase.end);
    span.dataset.index = String(phrase.index);
    span.style.setProperty("--colour", phrase.colour);
    span.tabIndex = 0;
    span.title = phrase.error ? `no mask: ${phrase.error}` :
      `attention peak ${point(phrase)}` + (phrase.score === null ? "" : `, mask score ${phrase.score.toFixed(2)}`);
    if (phrase.map) {
      span.addEventListener("mouseenter", () => showMap(turn, phrase));
      span.addEventListener("mouseleave", restoreSelection);
      span.addEventListener("focus", () => showMap(turn, phrase));
      span.addEventListener("click", () => select(turn, phrase, span));
      span.addEventListener("keydown", (event) => { if (event.key === "Enter") select(turn, phrase, span); });
      first = first || [phrase, span];
    } else {
      span.classList.add("unmapped");
    }
    element.append(span);
    at = phrase.end;
  }
  element.append(turn.answer.slice(at));
  const notes = [...turn.notes];
  if (turn.finish_reason === "stopped") notes.unshift("stopped");
  if (turn.finish_reason === "length") notes.unshift("the answer reached the longest length");
  if (!turn.phrases.length) notes.push("no noun phrase in the answer");
  for (const text of notes) {
    const note = document.createElement("div");
    note.className = "note";
    note.textContent = text;
    element.append(note);
  }
  showOverlay(turn);
  if (first) select(turn, first[0], first[1]);
}

function addMessage(role, text) {
  const message = document.createElement("div");
  message.className = `message ${role}`;
  message.textContent = text;
  $("log").append(message);
  message.scrollIntoView({block: "end"});
  return message;
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!question || state.busy || !state.image) return;
  showError("");
  setBusy(true);
  addMessage("user", question);
  const answer = addMessage("assistant streaming", "");
  let turn = null;
  try {
    const response = await fetch("/api/ask", {
      method: "POST",
      headers: {"Content-Type": "application/json", [state.header]: state.session},
      body: JSON.stringify({question, temperature: Number($("temperature").value)}),
    });
    if (!response.ok) await parse(response, "/api/ask");
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let tokens = 0;
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, {stream: true});
      let end;
      while ((end = buffer.indexOf("\n")) >= 0) {
        const message = JSON.parse(buffer.slice(0, end));
        buffer = buffer.slice(end + 1);
        if ("queued" in message) answer.textContent = `waiting: ${message.queued} request(s) ahead...`;
        if ("token" in message) answer.textContent = (tokens++ ? answer.textContent : "") + message.token;
        if ("error" in message) throw new Error(message.error);
        if ("turn" in message) turn = message.turn;
      }
    }
    if (!turn) throw new Error("the answer ended early: see the server's log");
    state.turns = turn.index + 1;
    renderAnswer(answer, turn);
    $("question").value = "";
  } catch (error) {
    answer.remove();
    showError(error.message);
  } finally {
    setBusy(false);
  }
}

async function save() {
  showError("");
  setBusy(true);
  try {
    const saved = await call("/api/save");
    const link = $("download");
    link.href = saved.url;
    link.download = saved.name;
    link.textContent = `${saved.name} (${saved.turns} turn${saved.turns === 1 ? "" : "s"})`;
    link.hidden = false;
    link.click();
  } catch (error) {
    showError(error.message);
  } finally {
    setBusy(false);
  }
}

async function reset() {
  showError("");
  setBusy(true);
  try {
    await call("/api/reset");
    state.turns = 0;
    state.selected = null;
    $("log").replaceChildren();
    $("download").hidden = true;
    showPicture(state.image.image, `${state.image.name}: a new conversation. Ask about it.`);
    clearMap();
  } catch (error) {
    showError(error.message);
  } finally {
    setBusy(false);
  }
}

async function start() {
  let info;
  try {
    info = await parse(await fetch("/api/session", {method: "POST"}), "/api/session");
  } catch (error) {
    showError(`cannot start a session: ${error.message}`);
    return;
  }
  state.session = info.session;
  state.header = info.header;
  state.maxBytes = info.max_upload_bytes;
  $("model").textContent = `${info.model}, ${info.conv_mode} conversation; SAM: ${info.sam ?? "not used"}; ` +
    `top_p ${info.top_p}, seed ${info.seed}, at most ${info.max_new_tokens} new tokens; images up to ` +
    `${info.max_upload_bytes.toLocaleString("en")} bytes and ${info.max_pixels.toLocaleString("en")} pixels`;
  const temperature = $("temperature");
  temperature.value = String(info.temperature);
  const shown = () => { $("temperature-value").textContent = Number(temperature.value) === 0 ? "0 (greedy)" :
                                                              temperature.value; };
  temperature.addEventListener("input", shown);
  shown();
  for (const example of info.examples) {
    const button = document.createElement("button");
    button.type = "button";
    button.title = example.name;
    const image = document.createElement("img");
    image.src = example.thumbnail;
    image.alt = example.name;
    button.append(image);
    button.addEventListener("click", () => setImage(() => call("/api/example",
                                                              {body: JSON.stringify({name: example.name})})));
    $("examples").append(button);
  }
  $("file").addEventListener("change", () => {
    const file = $("file").files[0];
    $("file").value = "";
    if (!file) return;
    if (file.size > state.maxBytes) {
      showError(`${file.name} is larger than ${state.maxBytes.toLocaleString("en")} bytes, the most this demo ` +
                "takes (--max-upload-bytes)");
      return;
    }
    setImage(() => call(`/api/upload?name=${encodeURIComponent(file.name)}`,
                        {body: file, type: "application/octet-stream"}));
  });
  $("ask").addEventListener("submit", ask);
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) ask(event);
  });
  $("stop").addEventListener("click", () => call("/api/stop").catch((error) => showError(error.message)));
  $("reset").addEventListener("click", reset);
  $("save").addEventListener("click", save);
  setBusy(false);
  document.body.dataset.ready = "1";
}

start();

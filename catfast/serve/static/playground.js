// catfast playground: picks adapters and weights, calls POST /v1/images/generations with "stream": true
// and reads its server-sent events (progress per denoising step, then one event per image).
"use strict";

const $ = (id) => document.getElementById(id);
const GALLERY_MAX = 24;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setStatus(text, isError) {
  const el = $("status");
  el.textContent = text;
  el.className = isError ? "error" : "muted";
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    return `${resp.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch (e) {
    return `${resp.status} ${resp.statusText}`;
  }
}

async function loadHealth() {
  const resp = await fetch("/health");
  if (!resp.ok) throw new Error(await errorText(resp));
  const h = await resp.json();
  $("model").textContent = `${h.model}, native ${h.native_size}x${h.native_size}`;
  const sel = $("size");
  sel.innerHTML = "";
  for (const s of h.defaults.sizes) {
    const opt = document.createElement("option");
    opt.value = `${s}x${s}`;
    opt.textContent = `${s}x${s}`;
    if (s === h.native_size) opt.selected = true;
    sel.appendChild(opt);
  }
  const sched = $("scheduler");
  sched.innerHTML = "";
  for (const name of h.defaults.schedulers || ["ddim"]) {
    const opt = document.createElement("option");
    opt.value = name;
    opt.textContent = name;
    sched.appendChild(opt);
  }
  $("steps").max = h.defaults.max_steps;
  $("steps").value = h.defaults.steps;
  $("guidance").value = h.defaults.guidance;
  if (h.defaults.max_guidance !== undefined) $("guidance").max = h.defaults.max_guidance;
  $("n").max = h.defaults.max_n;
  if (h.auth) document.querySelector("details").open = true;
}

async function loadAdapters() {
  const box = $("adapters");
  const resp = await fetch("/v1/adapters", { headers: headers() });
  if (!resp.ok) {
    box.innerHTML = "";
    setStatus("adapters: " + (await errorText(resp)), true);
    return;
  }
  const list = (await resp.json()).data;
  box.innerHTML = "";
  if (!list.length) box.textContent = "no adapters registered: the base model only";
  for (const a of list) {
    const row = document.createElement("div");
    row.className = "adapter";
    const pick = document.createElement("input");
    pick.type = "checkbox";
    pick.className = "pick";
    pick.dataset.name = a.id;
    pick.id = "pick-" + a.id;
    const name = document.createElement("label");
    name.className = "name";
    name.htmlFor = pick.id;
    name.textContent = a.id;
    name.title = `${a.format}, rank ${a.rank}, ${a.path}`;
    if (a.triggers && a.triggers.length) {
      const hint = document.createElement("span");
      hint.className = "trigger";
      hint.textContent = " " + a.triggers.join(", ");
      hint.title = "trigger word: put it in the prompt";
      name.appendChild(hint);
    }
    const weight = document.createElement("input");
    weight.type = "range";
    weight.min = "-2";
    weight.max = "2";
    weight.step = "0.05";
    weight.value = "1";
    weight.className = "slider";
    weight.dataset.name = a.id;
    const shown = document.createElement("span");
    shown.className = "weight";
    shown.textContent = "1.00";
    weight.addEventListener("input", () => { shown.textContent = Number(weight.value).toFixed(2); });
    row.append(pick, name, weight, shown);
    box.appendChild(row);
  }
}

function modelString() {
  const parts = [];
  for (const pick of document.querySelectorAll("input.pick")) {
    if (!pick.checked) continue;
    const w = document.querySelector(`input.slider[data-name="${CSS.escape(pick.dataset.name)}"]`).value;
    parts.push(Number(w) === 1 ? pick.dataset.name : `${pick.dataset.name}:${w}`);
  }
  return parts.length ? parts.join("+") : "base";
}

function figure(src, caption) {
  const fig = document.createElement("figure");
  const img = document.createElement("img");
  img.src = src;
  img.alt = caption;
  const cap = document.createElement("figcaption");
  cap.textContent = caption;
  fig.append(img, cap);
  return fig;
}

async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

async function generate(ev) {
  ev.preventDefault();
  const button = $("generate");
  const model = modelString();
  const prompt = $("prompt").value;
  const body = {
    model: model,
    prompt: prompt,
    negative_prompt: $("negative").value,
    n: Number($("n").value),
    size: $("size").value,
    steps: Number($("steps").value),
    guidance_scale: Number($("guidance").value),
    scheduler: $("scheduler").value,
    response_format: "b64_json",
    stream: true,
  };
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  button.disabled = true;
  $("current").innerHTML = "";
  $("progress").value = 0;
  setStatus(`queued: ${model}`);
  const t0 = performance.now();
  try {
    const resp = await fetch("/v1/images/generations", { method: "POST", headers: headers(), body: JSON.stringify(body) });
    if (!resp.ok) throw new Error(await errorText(resp));
    let got = 0;
    for await (const e of sseEvents(resp)) {
      if (e.type === "image_generation.progress") {
        $("progress").max = e.steps;
        $("progress").value = e.step;
        setStatus(`step ${e.step} / ${e.steps}`);
      } else if (e.type === "image_generation.completed") {
        const src = "data:image/png;base64," + e.b64_json;
        const caption = `${model} | seed ${e.seed} #${e.index} | ${prompt}`;
        $("current").appendChild(figure(src, caption));
        $("gallery").prepend(figure(src, caption));
        while ($("gallery").children.length > GALLERY_MAX) $("gallery").lastChild.remove();
        got += 1;
      } else if (e.type === "error") {
        throw new Error(`${e.error.status}: ${e.error.message}`);
      }
    }
    const secs = ((performance.now() - t0) / 1000).toFixed(1);
    setStatus(got ? `done: ${got} image(s) in ${secs} s` : "the server ended the stream without images", !got);
  } catch (e) {
    setStatus(String(e.message || e), true);
  } finally {
    button.disabled = false;
  }
}

async function init() {
  $("form").addEventListener("submit", generate);
  $("random-seed").addEventListener("click", () => { $("seed").value = Math.floor(Math.random() * 2 ** 31); });
  $("apikey").addEventListener("change", loadAdapters);
  try {
    await loadHealth();
    await loadAdapters();
  } catch (e) {
    setStatus("cannot reach the server: " + (e.message || e), true);
  }
}

init();

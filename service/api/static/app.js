/* modelserve page, part 2: playground, compare, live metrics and adapter admin.
   Talks only to this server (same origin). API keys live in page memory (input fields), never storage. */
"use strict";
(function () {
  const M = window.MSMetrics;
  const $ = (id) => document.getElementById(id);
  const POLL_MS = 2000, HISTORY = 90;
  const banners = { ready: null, models: null };
  let models = [];

  function setBanner(key, msg) {
    banners[key] = msg;
    const text = Object.values(banners).filter(Boolean).join(" · ");
    $("banner").textContent = text;
    $("banner").hidden = !text;
  }

  function headers(admin) {
    const h = { "Content-Type": "application/json" };
    const key = (admin ? $("admin-key") : $("api-key")).value.trim();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  /* The server's error.message from a failed response (falls back to the status line). */
  async function errorOf(resp) {
    let text = "";
    try { text = await resp.text(); const body = JSON.parse(text); if (body.error) return `${resp.status}: ${body.error.message}`;
      if (body.detail) return `${resp.status}: ${typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail)}`;
    } catch (e) { /* not JSON */ }
    return `${resp.status} ${resp.statusText}${text ? ": " + text.slice(0, 200) : ""}`;
  }

  // ---------------------------------------------------------------- readiness and models
  async function checkReady() {
    try {
      const resp = await fetch("/ready", { headers: headers(false) });
      const badge = $("ready");
      if (resp.ok) {
        badge.textContent = "ready"; badge.className = "badge ok"; setBanner("ready", null);
        if (!models.length) loadModels();
      } else {
        let detail = "";
        try { const b = await resp.clone().json(); detail = b.detail || (b.error && b.error.message) || b.status; } catch (e) { /* */ }
        badge.textContent = resp.status === 503 ? "not ready" : `ready: ${resp.status}`; badge.className = "badge bad";
        setBanner("ready", resp.status === 503 ? `Server not ready (503): ${detail || "try again shortly"}`
          : `Readiness check failed: ${await errorOf(resp)}`);
      }
    } catch (e) {
      $("ready").textContent = "unreachable"; $("ready").className = "badge bad";
      setBanner("ready", `Server unreachable: ${e.message}`);
    }
  }

  async function loadModels() {
    let resp;
    try { resp = await fetch("/v1/models", { headers: headers(false) }); } catch (e) { setBanner("models", e.message); return; }
    if (!resp.ok) { setBanner("models", `Could not list models: ${await errorOf(resp)}`); return; }
    setBanner("models", null);
    const data = (await resp.json()).data || [];
    const bases = data.filter((m) => !m.parent), adapters = data.filter((m) => m.parent);
    models = [...bases, ...adapters];
    const label = (m) => (m.parent ? `${m.id}  (LoRA r${m.lora_rank ?? "?"} on ${m.parent})` : m.id);
    const sel = $("pg-model"), prev = sel.value;
    sel.textContent = "";
    for (const m of models) sel.add(new Option(label(m), m.id));
    if (models.some((m) => m.id === prev)) sel.value = prev;
    const checked = new Set([...document.querySelectorAll("#cmp-models input:checked")].map((i) => i.value));
    const box = $("cmp-models");
    box.textContent = "";
    models.forEach((m, i) => {
      const l = document.createElement("label"), c = document.createElement("input");
      c.type = "checkbox"; c.value = m.id; c.checked = checked.size ? checked.has(m.id) : i < 2;
      l.append(c, " " + label(m));
      box.append(l);
    });
  }

  // ---------------------------------------------------------------- streaming generation
  function params(model, prompt) {
    const body = {
      model, stream: true, stream_options: { include_usage: true },
      max_tokens: parseInt($("pg-max").value, 10) || 16,
      temperature: parseFloat($("pg-temp").value), top_p: parseFloat($("pg-topp").value),
    };
    if ($("pg-mode").value === "chat") body.messages = [{ role: "user", content: prompt }];
    else body.prompt = prompt;
    return body;
  }

  /* Streams one request; onText(text, stats) per content chunk. Resolves to the final stats; throws
     Error(server message) on an error response or an error event. */
  async function generate(body, onText, signal) {
    const chat = !!body.messages;
    const t0 = performance.now();
    const stats = { ttft: null, gaps: [], chunks: 0, usage: null, finish: null, t0, last: null };
    const resp = await fetch(chat ? "/v1/chat/completions" : "/v1/completions",
      { method: "POST", headers: headers(false), body: JSON.stringify(body), signal });
    if (!resp.ok) throw new Error(await errorOf(resp));
    const reader = resp.body.getReader(), decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut); buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") return stats;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(`stream error: ${chunk.error.message}`);
          if (chunk.usage) stats.usage = chunk.usage;
          const choice = (chunk.choices || [])[0];
          if (!choice) continue;
          if (choice.finish_reason) stats.finish = choice.finish_reason;
          const text = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
          if (!text) continue;
          const now = performance.now();
          if (stats.ttft == null) stats.ttft = now - t0; else stats.gaps.push(now - stats.last);
          stats.last = now; stats.chunks += 1;
          onText(text, stats);
        }
      }
    }
    return stats;
  }

  function statsHtml(s, running) {
    const ms = (v) => (v == null ? "–" : `${v.toFixed(0)} ms`);
    const gaps = [...s.gaps].sort((a, b) => a - b);
    const mean = gaps.length ? gaps.reduce((a, b) => a + b, 0) / gaps.length : null;
    const p50 = gaps.length ? gaps[Math.floor(gaps.length / 2)] : null;
    // Chunks that arrive in one network read share a timestamp; below 1 ms a rate means nothing.
    const n = s.usage ? s.usage.completion_tokens : s.chunks, decodeMs = s.last - s.t0 - s.ttft;
    const decode = n > 1 && decodeMs >= 1 ? ((n - 1) * 1000) / decodeMs : null;
    const total = s.last ? (n * 1000) / (s.last - s.t0) : null;
    const toks = s.usage ? `${s.usage.prompt_tokens} prompt + ${s.usage.completion_tokens} generated` : `${s.chunks} chunks`;
    return `TTFT <b>${ms(s.ttft)}</b> · inter-token mean <b>${ms(mean)}</b> p50 <b>${ms(p50)}</b> · ` +
      `decode <b>${M.fmt(decode)} tok/s</b> (overall ${M.fmt(total)}) · ${toks}` +
      (running ? " · streaming…" : s.finish ? ` · finish <b>${s.finish}</b>` : "");
  }

  let controller = null;
  async function runPlayground() {
    const out = $("pg-output"), st = $("pg-stats");
    out.textContent = ""; out.classList.remove("error"); st.textContent = "waiting for the first token…";
    controller = new AbortController();
    $("pg-run").disabled = true; $("pg-stop").disabled = false;
    try {
      const s = await generate(params($("pg-model").value, $("pg-prompt").value),
        (text, s) => { out.textContent += text; st.innerHTML = statsHtml(s, true); }, controller.signal);
      st.innerHTML = statsHtml(s, false);
    } catch (e) {
      if (e.name === "AbortError") st.textContent += " · stopped";
      else { out.classList.add("error"); out.textContent = e.message; st.textContent = ""; }
    } finally {
      $("pg-run").disabled = false; $("pg-stop").disabled = true;
    }
  }

  async function runCompare() {
    const ids = [...document.querySelectorAll("#cmp-models input:checked")].map((i) => i.value);
    const results = $("cmp-results");
    results.textContent = "";
    if (!ids.length) { results.textContent = "Tick at least one model or adapter."; return; }
    $("cmp-run").disabled = true;
    await Promise.all(ids.map(async (id) => {
      const card = document.createElement("div"), h = document.createElement("h4");
      const out = document.createElement("pre"), st = document.createElement("div");
      card.className = "card"; card.dataset.model = id; h.textContent = id;
      out.className = "output"; st.className = "stats"; st.textContent = "waiting…";
      card.append(h, out, st); results.append(card);
      try {
        const s = await generate(params(id, $("cmp-prompt").value),
          (text, s) => { out.textContent += text; st.innerHTML = statsHtml(s, true); });
        st.innerHTML = statsHtml(s, false);
      } catch (e) { out.classList.add("error"); out.textContent = e.message; st.textContent = ""; }
    }));
    $("cmp-run").disabled = false;
  }

  // ---------------------------------------------------------------- live metrics
  const hist = { req: [], tok: [], ttft50: [], ttft95: [], itl50: [], itl95: [], run: [], wait: [], kv: [] };
  let prev = null;

  function push(key, v) { hist[key].push(v); if (hist[key].length > HISTORY) hist[key].shift(); }

  function tile(k, v) { return `<div class="tile"><div class="k">${k}</div><div class="v">${v}</div></div>`; }

  async function pollMetrics() {
    let text;
    try {
      const resp = await fetch("/metrics", { headers: headers(false) });
      if (!resp.ok) { $("m-status").textContent = `metrics unavailable: ${await errorOf(resp)}`; return; }
      text = await resp.text();
    } catch (e) { $("m-status").textContent = `metrics unavailable: ${e.message}`; return; }
    const now = performance.now(), s = M.parse(text);
    const P = "modelserve_";
    const cur = {
      t: now, req: M.sum(s, P + "requests_total"), tok: M.sum(s, P + "generation_tokens_total"),
      ttft: M.buckets(s, P + "time_to_first_token_seconds"), itl: M.buckets(s, P + "inter_token_latency_seconds"),
      experts: M.groupBy(s, P + "moe_expert_tokens_total", ["model", "layer", "expert"]),
    };
    const dt = prev ? (now - prev.t) / 1000 : null;
    const rate = (k) => (prev && dt > 0 ? Math.max(0, cur[k] - prev[k]) / dt : null);
    const q = (k, p) => { const v = M.quantile(p, cur[k], prev && prev[k]); return v == null ? null : v * 1000; };
    const kvByModel = M.groupBy(s, P + "kv_cache_usage_ratio", ["model"]);
    const kvMax = Math.max(0, ...Object.values(kvByModel));
    push("req", rate("req")); push("tok", rate("tok"));
    push("ttft50", q("ttft", 0.5)); push("ttft95", q("ttft", 0.95));
    push("itl50", q("itl", 0.5)); push("itl95", q("itl", 0.95));
    push("run", M.sum(s, P + "num_requests_running")); push("wait", M.sum(s, P + "num_requests_waiting"));
    push("kv", kvMax * 100);
    const ratio = (a, b) => (b > 0 ? `${((100 * a) / b).toFixed(1)}%` : "–");
    const draft = M.sum(s, P + "spec_decode_draft_tokens_total"), acc = M.sum(s, P + "spec_decode_accepted_tokens_total");
    const pq = M.sum(s, P + "prefix_cache_queries_total"), ph = M.sum(s, P + "prefix_cache_hits_total");
    const last = (k) => M.fmt(hist[k][hist[k].length - 1]);
    $("m-tiles").innerHTML = [
      tile("requests/s", last("req")), tile("tokens/s", last("tok")),
      tile("requests total", `<span id="m-req-total">${cur.req.toFixed(0)}</span>`),
      tile("tokens generated", `<span id="m-tok-total">${cur.tok.toFixed(0)}</span>`),
      tile("TTFT p50 / p95 ms", `${last("ttft50")} / ${last("ttft95")}`),
      tile("inter-token p50 / p95 ms", `${last("itl50")} / ${last("itl95")}`),
      tile("running / waiting", `${last("run")} / ${last("wait")}`),
      tile("KV cache (max model)", `${(kvMax * 100).toFixed(1)}%`),
      tile("spec. acceptance", ratio(acc, draft)), tile("prefix-cache hits", ratio(ph, pq)),
    ].join("");
    $("m-status").textContent = `polled ${new Date().toLocaleTimeString()}; percentiles over the last ${dt ? dt.toFixed(1) : "–"} s`;
    M.lines($("c-rate"), [hist.req, hist.tok], ["req/s", "tok/s"]);
    M.lines($("c-ttft"), [hist.ttft50, hist.ttft95], ["p50", "p95"]);
    M.lines($("c-itl"), [hist.itl50, hist.itl95], ["p50", "p95"]);
    M.lines($("c-load"), [hist.run, hist.wait, hist.kv], ["running", "waiting", "KV %"]);
    drawExperts(cur.experts, prev && prev.experts);
    drawAdapters(s);
    prev = cur;
  }

  /* One heatmap per MoE model: this interval's tokens per expert when any, else the totals since start. */
  function drawExperts(now, before) {
    const perModel = {};
    for (const [k, v] of Object.entries(now)) {
      const [model, layer, expert] = k.split("|");
      const d = v - ((before && before[k]) || 0);
      ((perModel[model] ||= { d: {}, t: {} }).d[`${layer}|${expert}`] = d);
      perModel[model].t[`${layer}|${expert}`] = v;
    }
    const box = $("m-moe");
    if (!Object.keys(perModel).length) { box.textContent = "no MoE model served"; return; }
    if (box.querySelector("p") || box.textContent === "no MoE model served") box.textContent = "";
    for (const [model, { d, t }] of Object.entries(perModel)) {
      const live = Object.values(d).some((v) => v > 0);
      const src = live ? d : t, rows = [];
      for (const [k, v] of Object.entries(src)) {
        const [layer, expert] = k.split("|").map(Number);
        (rows[layer] ||= [])[expert] = v;
      }
      const shares = rows.map((r) => { const tot = (r || []).reduce((a, b) => a + (b || 0), 0);
        return (r || []).map((v) => (tot > 0 ? (v || 0) / tot : 0)); });
      let fig = box.querySelector(`figure[data-model="${CSS.escape(model)}"]`);
      if (!fig) {
        fig = document.createElement("figure"); fig.dataset.model = model;
        fig.append(document.createElement("canvas")); box.append(fig);
      }
      M.heatmap(fig.querySelector("canvas"), shares, `${model}: ${live ? "last interval" : "since start"}`);
    }
  }

  function drawAdapters(s) {
    const P = "modelserve_";
    const resident = M.groupBy(s, P + "lora_adapters_resident", ["model"]);
    const loads = M.groupBy(s, P + "lora_adapter_loads_total", ["model", "result"]);
    const evictions = M.groupBy(s, P + "lora_adapter_evictions_total", ["model"]);
    const names = Object.keys(resident).filter((m) => m);
    if (!names.length) { $("m-adapters").textContent = "no adapter metrics"; return; }
    const loadText = (m) => Object.entries(loads).filter(([k]) => k.startsWith(m + "|"))
      .map(([k, v]) => `${k.split("|")[1]} ${v}`).join(", ") || "0";
    const esc = (x) => x.replace(/[&<>"]/g, (c) => `&#${c.charCodeAt(0)};`);
    $("m-adapters").innerHTML = "<table><tr><th>model</th><th>resident</th><th>loads</th><th>evictions</th></tr>" +
      names.map((m) => `<tr><td>${esc(m)}</td><td>${resident[m]}</td><td>${esc(loadText(m))}</td><td>${evictions[m] || 0}</td></tr>`).join("") +
      "</table>";
  }

  // ---------------------------------------------------------------- admin
  async function admin(action) {
    const out = $("ad-result"), name = $("ad-name").value.trim();
    const body = action === "load" ? { lora_name: name, lora_path: $("ad-path").value.trim() } : { lora_name: name };
    out.classList.remove("error"); out.textContent = `${action}ing ${name}…`;
    try {
      const resp = await fetch(`/v1/${action}_lora_adapter`, { method: "POST", headers: headers(true), body: JSON.stringify(body) });
      if (!resp.ok) { const message = await errorOf(resp); out.classList.add("error"); out.textContent = message; return; }
      const text = await resp.text();
      out.textContent = `${action}ed ${name}: ${text.slice(0, 300)}`;
      loadModels();
    } catch (e) { out.classList.add("error"); out.textContent = e.message; }
  }

  // ---------------------------------------------------------------- wiring
  $("pg-run").addEventListener("click", runPlayground);
  $("pg-stop").addEventListener("click", () => controller && controller.abort());
  $("cmp-run").addEventListener("click", runCompare);
  $("ad-load").addEventListener("click", () => admin("load"));
  $("ad-unload").addEventListener("click", () => admin("unload"));
  $("api-key").addEventListener("change", () => { loadModels(); checkReady(); });
  const tick = () => { checkReady(); pollMetrics(); };
  tick();
  setInterval(tick, POLL_MS);
})();

/* modelserve page, part 1: Prometheus text parsing, histogram quantiles and <canvas> charts.
   No library: the page must work offline. Exposes window.MSMetrics; app.js drives it. */
"use strict";
(function () {
  const LABEL = /([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g;

  /* Prometheus text format -> [{name, labels, value}] (comments skipped). */
  function parse(text) {
    const out = [];
    for (const line of text.split("\n")) {
      if (!line || line[0] === "#") continue;
      const brace = line.indexOf("{");
      let name, labels = {}, rest;
      if (brace >= 0 && brace < line.indexOf(" ")) {
        const close = line.lastIndexOf("}");
        name = line.slice(0, brace);
        const body = line.slice(brace + 1, close);
        let m;
        LABEL.lastIndex = 0;
        while ((m = LABEL.exec(body))) labels[m[1]] = m[2].replace(/\\n/g, "\n").replace(/\\(.)/g, "$1");
        rest = line.slice(close + 1).trim();
      } else {
        const sp = line.indexOf(" ");
        name = line.slice(0, sp);
        rest = line.slice(sp + 1).trim();
      }
      const value = parseFloat(rest.split(" ")[0]);
      if (!Number.isNaN(value) || rest.startsWith("NaN")) out.push({ name, labels, value });
    }
    return out;
  }

  /* Sum of a sample name's values over the samples whose labels match `where` (a predicate). */
  function sum(samples, name, where) {
    let s = 0;
    for (const x of samples) if (x.name === name && (!where || where(x.labels))) s += x.value;
    return s;
  }

  /* {key: value} summed by the label values named in `keys` (joined with "|"). */
  function groupBy(samples, name, keys) {
    const out = {};
    for (const x of samples) {
      if (x.name !== name) continue;
      const k = keys.map((key) => x.labels[key]).join("|");
      out[k] = (out[k] || 0) + x.value;
    }
    return out;
  }

  /* Histogram buckets summed over all label sets: [[le, cumulative count]] sorted by le. */
  function buckets(samples, base) {
    const byLe = groupBy(samples, base + "_bucket", ["le"]);
    return Object.entries(byLe)
      .map(([le, c]) => [le === "+Inf" ? Infinity : parseFloat(le), c])
      .sort((a, b) => a[0] - b[0]);
  }

  /* Quantile q of the observations between two bucket snapshots (prev may be null: since start),
     linearly interpolated inside the bucket, as Prometheus' histogram_quantile does. null if none. */
  function quantile(q, now, prev) {
    const before = new Map(prev ? prev.map(([le, c]) => [le, c]) : []);
    const d = now.map(([le, c]) => [le, c - (before.get(le) || 0)]);
    const total = d.length ? d[d.length - 1][1] : 0;
    if (total <= 0) return null;
    const rank = q * total;
    let lo = 0, below = 0;
    for (const [le, c] of d) {
      if (c >= rank) {
        if (le === Infinity) return lo;
        const inBucket = c - below;
        return inBucket > 0 ? lo + ((le - lo) * (rank - below)) / inBucket : le;
      }
      lo = le; below = c;
    }
    return lo;
  }

  function sizeCanvas(canvas, cssHeight) {
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(50, canvas.clientWidth), h = cssHeight || canvas.clientHeight || 110;
    if (canvas.width !== Math.round(w * dpr) || canvas.height !== Math.round(h * dpr)) {
      canvas.width = Math.round(w * dpr);
      canvas.height = Math.round(h * dpr);
    }
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, w, h);
    return [ctx, w, h];
  }

  const COLORS = ["#2563eb", "#dc6803", "#067647", "#9e77ed"];

  /* Line chart of several series (arrays of numbers or null), the y axis from 0 to the max. */
  function lines(canvas, series, names) {
    const [ctx, w, h] = sizeCanvas(canvas);
    const pad = 4, top = 16;
    let max = 0, n = 0;
    for (const s of series) for (const v of s) if (v != null && v > max) max = v;
    for (const s of series) n = Math.max(n, s.length);
    const top_ = max;
    max = max > 0 ? max * 1.1 : 1;
    ctx.strokeStyle = "#e5e7eb";
    ctx.beginPath(); ctx.moveTo(0, h - pad); ctx.lineTo(w, h - pad); ctx.stroke();
    ctx.font = "10px system-ui, sans-serif";
    series.forEach((s, i) => {
      ctx.strokeStyle = COLORS[i % COLORS.length];
      ctx.lineWidth = 1.5;
      ctx.beginPath();
      let started = false;
      s.forEach((v, j) => {
        if (v == null) { started = false; return; }
        const x = n > 1 ? (j / (n - 1)) * (w - 2 * pad) + pad : pad;
        const y = h - pad - (v / max) * (h - pad - top);
        if (started) ctx.lineTo(x, y); else { ctx.moveTo(x, y); started = true; }
      });
      ctx.stroke();
      const lastIdx = s.length - 1;
      if (lastIdx >= 0 && s[lastIdx] != null) { // a dot on the newest point, so one sample shows too
        const x = n > 1 ? (lastIdx / (n - 1)) * (w - 2 * pad) + pad : pad;
        ctx.fillStyle = COLORS[i % COLORS.length];
        ctx.fillRect(x - 2, h - pad - (s[lastIdx] / max) * (h - pad - top) - 2, 4, 4);
      }
      const last = [...s].reverse().find((v) => v != null);
      ctx.fillStyle = COLORS[i % COLORS.length];
      ctx.fillText(`${names[i]} ${last == null ? "–" : fmt(last)}`, pad + i * 92, 11);
    });
    ctx.fillStyle = "#98a2b3";
    ctx.textAlign = "right";
    ctx.fillText(`max ${fmt(top_)}`, w - pad, 11);
    ctx.textAlign = "left";
  }

  /* Heatmap: rows[layer][expert] = share of tokens (0..1); darker = more tokens. */
  function heatmap(canvas, rows, title) {
    const experts = Math.max(...rows.map((r) => r.length), 1);
    const cell = 26, left = 28, top = 14;
    canvas.style.height = `${top + rows.length * cell + 4}px`;
    const [ctx, w] = sizeCanvas(canvas, top + rows.length * cell + 4);
    const cw = Math.max(8, Math.min(cell, (w - left) / experts));
    ctx.font = "10px system-ui, sans-serif";
    ctx.fillStyle = "#667085";
    ctx.fillText(title, 0, 10);
    const even = 1 / experts;
    rows.forEach((row, layer) => {
      ctx.fillStyle = "#667085";
      ctx.fillText(`L${layer}`, 0, top + layer * cell + cell / 2 + 3);
      row.forEach((share, e) => {
        const t = Math.min(1, share / (2 * even)); // even load = mid colour; twice the fair share = darkest
        ctx.fillStyle = `rgb(${Math.round(239 - 202 * t)},${Math.round(246 - 147 * t)},${Math.round(255 - 20 * t)})`;
        ctx.fillRect(left + e * cw, top + layer * cell, cw - 1, cell - 1);
      });
    });
  }

  function fmt(v) {
    if (v == null || !Number.isFinite(v)) return "–";
    if (Number.isInteger(v)) return String(v);
    const a = Math.abs(v);
    return a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : a >= 1 ? v.toFixed(2) : v.toFixed(3);
  }

  window.MSMetrics = { parse, sum, groupBy, buckets, quantile, lines, heatmap, fmt };
})();

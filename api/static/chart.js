"use strict";
// The job page's chart, in plain SVG: training and validation loss against step (left axis) and the
// learning rate (right axis). Drawn at the container's pixel size, so labels stay readable on a phone.
(function () {
  const NS = "http://www.w3.org/2000/svg";
  const MARGIN = { top: 12, right: 62, bottom: 34, left: 52 };
  const MAX_MARKERS = 300; // beyond this a curve is drawn as a line only

  function el(name, attrs, parent) {
    const node = document.createElementNS(NS, name);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
    if (parent) parent.appendChild(node);
    return node;
  }

  function niceStep(span, count) {
    const raw = span / Math.max(1, count);
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    const unit = [1, 2, 2.5, 5, 10].find((m) => m * power >= raw) || 10;
    return unit * power;
  }

  function ticks(lo, hi, count) {
    const step = hi > lo ? niceStep(hi - lo, count) : 1;
    const values = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) values.push(+v.toPrecision(12));
    return { values, step };
  }

  // As many decimals as the tick step needs, so close ticks (6.265, 6.270) never print alike.
  function fixedFor(step) {
    const decimals = (step.toPrecision(2).split(".")[1] || "").replace(/0+$/, "").length;
    return (value) => value.toFixed(decimals);
  }

  function label(value) {
    if (value === 0) return "0";
    const abs = Math.abs(value);
    if (abs < 1e-3 || abs >= 1e5) return value.toExponential(1);
    return String(+value.toPrecision(3));
  }

  function domain(values, padded) {
    let lo = Math.min(...values), hi = Math.max(...values);
    if (lo === hi) { lo -= Math.abs(lo) * 0.1 || 1; hi += Math.abs(hi) * 0.1 || 1; }
    if (padded) { const pad = (hi - lo) * 0.06; lo -= pad; hi += pad; }
    return [lo, hi];
  }

  function path(points, x, y) {
    return points.map(([s, v], i) => `${i ? "L" : "M"}${x(s).toFixed(1)},${y(v).toFixed(1)}`).join("");
  }

  function markers(group, points, x, y, cls, name) {
    if (points.length > MAX_MARKERS) return;
    for (const [s, v] of points) {
      const dot = el("circle", { cx: x(s).toFixed(1), cy: y(v).toFixed(1), r: cls === "valid" ? 3.5 : 2.2, class: `pt ${cls}` }, group);
      el("title", {}, dot).textContent = `${name} at step ${s}: ${label(v)}`;
    }
  }

  function render(container, data) {
    const train = data.train_loss || [], valid = data.valid_loss || [], rates = data.learning_rate || [];
    const width = Math.max(280, container.clientWidth || 720), height = Math.max(180, container.clientHeight || 300);
    const svg = el("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img" });
    const inner = { w: width - MARGIN.left - MARGIN.right, h: height - MARGIN.top - MARGIN.bottom };
    const losses = train.concat(valid);
    svg.dataset.points = String(losses.length);
    if (!losses.length) {
      svg.setAttribute("aria-label", "Loss chart: no metrics yet");
      el("text", { x: width / 2, y: height / 2, "text-anchor": "middle", class: "empty-text" }, svg).textContent =
        "No metrics yet: the curves appear as the job trains.";
      container.replaceChildren(svg);
      return;
    }
    const steps = losses.concat(rates).map((p) => p[0]);
    const maxStep = Math.max(data.total_steps || 0, ...steps, 1);
    const [yLo, yHi] = domain(losses.map((p) => p[1]), true);
    const lrHi = rates.length ? Math.max(...rates.map((p) => p[1])) || 1 : 1;
    const x = (s) => MARGIN.left + (s / maxStep) * inner.w;
    const y = (v) => MARGIN.top + (1 - (v - yLo) / (yHi - yLo)) * inner.h;
    const yr = (v) => MARGIN.top + (1 - v / (lrHi * 1.06)) * inner.h;

    const axes = el("g", { class: "axis" }, svg);
    const lossTicks = ticks(yLo, yHi, 5);
    const lossLabel = fixedFor(lossTicks.step);
    for (const t of lossTicks.values) {
      el("line", { x1: MARGIN.left, x2: MARGIN.left + inner.w, y1: y(t), y2: y(t), class: "grid-line" }, axes);
      el("text", { x: MARGIN.left - 6, y: y(t) + 4, "text-anchor": "end" }, axes).textContent = lossLabel(t);
    }
    for (const t of ticks(0, maxStep, Math.max(2, Math.floor(inner.w / 90))).values) {
      if (t !== Math.round(t)) continue;
      el("line", { x1: x(t), x2: x(t), y1: MARGIN.top + inner.h, y2: MARGIN.top + inner.h + 4 }, axes);
      el("text", { x: x(t), y: MARGIN.top + inner.h + 17, "text-anchor": "middle" }, axes).textContent = label(t);
    }
    if (rates.length) {
      for (const t of ticks(0, lrHi, 4).values) {
        el("text", { x: MARGIN.left + inner.w + 6, y: yr(t) + 4, "text-anchor": "start" }, axes).textContent = label(t);
      }
    }
    el("path", { d: `M${MARGIN.left},${MARGIN.top}V${MARGIN.top + inner.h}H${MARGIN.left + inner.w}`, fill: "none" }, axes);
    el("text", { x: MARGIN.left + inner.w / 2, y: height - 4, "text-anchor": "middle" }, axes).textContent = "step";
    el("text", { x: 12, y: MARGIN.top + inner.h / 2, "text-anchor": "middle",
                 transform: `rotate(-90 12 ${MARGIN.top + inner.h / 2})` }, axes).textContent = "loss";

    const plot = el("g", {}, svg);
    if (rates.length > 1) el("path", { d: path(rates, x, yr), class: "line lr" }, plot);
    if (train.length > 1) el("path", { d: path(train, x, y), class: "line train" }, plot);
    if (valid.length > 1) el("path", { d: path(valid, x, y), class: "line valid" }, plot);
    markers(plot, train, x, y, "train", "Training loss");
    markers(plot, valid, x, y, "valid", "Validation loss");

    const last = train[train.length - 1];
    const summary = [`Training loss over ${train.length} steps` + (last ? `, latest ${label(last[1])} at step ${last[0]}` : "")];
    if (valid.length) summary.push(`validation loss ${label(valid[0][1])} to ${label(valid[valid.length - 1][1])}`);
    svg.setAttribute("aria-label", summary.join("; "));
    container.replaceChildren(svg);
  }

  window.LossChart = { render };
})();

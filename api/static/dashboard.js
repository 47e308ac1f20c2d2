"use strict";
// Live pages without reloads: <main data-poll="URL"> is refreshed from a small JSON poll of the dashboard,
// whose `fragments` replace parts of the page by id; `chart` redraws the loss chart; `done` stops polling.
(function () {
  let chartData = null;

  function drawChart() {
    const container = document.getElementById("loss-chart");
    if (container && chartData && window.LossChart) window.LossChart.render(container, chartData);
  }

  function initChart() {
    const source = document.getElementById("chart-data");
    if (!source) return;
    chartData = JSON.parse(source.textContent);
    drawChart();
    let pending = null;
    window.addEventListener("resize", () => {
      clearTimeout(pending);
      pending = setTimeout(drawChart, 150);
    });
  }

  function apply(update) {
    for (const [id, html] of Object.entries(update.fragments || {})) {
      const target = document.getElementById(id);
      if (target && target.dataset.html !== html) {
        target.innerHTML = html;
        target.dataset.html = html;
      }
    }
    if (update.chart) {
      chartData = update.chart;
      drawChart();
    }
  }

  function startPolling(main) {
    const url = main.dataset.poll;
    const interval = Number(main.dataset.interval) || 1500;
    let stopped = false;

    async function tick() {
      if (stopped) return;
      if (document.hidden) { setTimeout(tick, interval); return; }
      try {
        const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" });
        if (response.status === 401) {
          window.location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
          return;
        }
        if (response.ok) {
          const update = await response.json();
          apply(update);
          if (update.done) { stopped = true; main.dataset.pollDone = "true"; return; }
        }
      } catch (error) {
        // The server is restarting or the network blinked: the next tick tries again.
      }
      setTimeout(tick, interval);
    }
    setTimeout(tick, interval);
  }

  function initFilters() {
    for (const select of document.querySelectorAll("select[data-autosubmit]")) {
      select.addEventListener("change", () => select.form.submit());
    }
  }

  document.addEventListener("DOMContentLoaded", () => {
    initFilters();
    initChart();
    const main = document.querySelector("main[data-poll]");
    if (main) startPolling(main);
  });
})();

"use strict";
// Live pages without reloads: <main data-poll="URL"> is refreshed from a small JSON poll of the dashboard.
// A poll sends only what changed: `fragments` replace parts of the page by id, `events` are the job's events
// after the last one seen (data-since), `chart` the new loss points, `version` names the panels the page has
// (data-version) so they are sent again only when they change, `done` stops polling. A failed poll shows
// "connection lost" and retries with backoff until the API answers again.
(function () {
  const MAX_BACKOFF_MS = 10000;
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

  // New points replace those of the same step (a resumed run trains some steps again).
  function mergeCurve(old, added) {
    if (!added.length) return old;
    const byStep = new Map(old);
    for (const [step, value] of added) byStep.set(step, value);
    return Array.from(byStep.entries()).sort((a, b) => a[0] - b[0]);
  }

  function applyChart(chart) {
    if (!chart || !document.getElementById("loss-chart")) return;
    const curves = ["train_loss", "valid_loss", "learning_rate"];
    if (chart.reset || !chartData) {
      chartData = chart;
    } else {
      const added = curves.some((name) => (chart[name] || []).length);
      if (!added && chart.total_steps === chartData.total_steps) return;
      for (const name of curves) chartData[name] = mergeCurve(chartData[name] || [], chart[name] || []);
      chartData.total_steps = chart.total_steps;
    }
    drawChart();
  }

  function applyEvents(events) {
    const log = document.getElementById("event-log");
    if (!events || !log) return;
    if (events.reset) log.innerHTML = "";
    if (events.html) {
      log.insertAdjacentHTML("afterbegin", events.html);
      const keep = Number(log.dataset.keep) || 200;
      while (log.children.length > keep) log.lastElementChild.remove();
    }
    const empty = document.getElementById("no-events");
    if (empty) empty.hidden = log.children.length > 0;
  }

  // The status is announced once per change, not each time the progress panel redraws.
  function announce(summary) {
    const announcer = document.getElementById("status-announcer");
    if (!summary || !announcer) return;
    if (announcer.dataset.status === undefined) {
      announcer.dataset.status = summary.status; // the page already shows the status it loaded with
      return;
    }
    if (announcer.dataset.status !== summary.status) {
      announcer.dataset.status = summary.status;
      announcer.textContent = "Job status: " + summary.status_label;
    }
  }

  function apply(main, update) {
    for (const [id, html] of Object.entries(update.fragments || {})) {
      const target = document.getElementById(id);
      if (target && target.dataset.html !== html) {
        target.innerHTML = html;
        target.dataset.html = html;
      }
    }
    applyEvents(update.events);
    applyChart(update.chart);
    announce(update.summary);
    if (update.version) main.dataset.version = update.version;
    if (update.events && update.events.since) main.dataset.since = update.events.since;
  }

  function pollUrl(main) {
    const url = new URL(main.dataset.poll, location.href);
    if (main.dataset.since) url.searchParams.set("since", main.dataset.since);
    if (main.dataset.version) url.searchParams.set("v", main.dataset.version);
    return url.toString();
  }

  function connectionNotice(text) {
    const notice = document.getElementById("connection-status");
    if (!notice) return;
    notice.hidden = !text;
    notice.textContent = text || "";
    document.body.classList.toggle("connection-stale", Boolean(text));
  }

  function startPolling(main) {
    const baseInterval = Number(main.dataset.interval) || 1500;
    let interval = baseInterval;
    let failures = 0;

    function later(ms) { setTimeout(tick, ms); }

    async function tick() {
      if (document.hidden) { later(interval); return; }
      let response = null;
      try {
        response = await fetch(pollUrl(main), { headers: { Accept: "application/json" }, credentials: "same-origin" });
      } catch (error) {
        response = null; // the API is restarting or the network dropped
      }
      if (response && response.status === 401) {
        window.location.assign("/login?next=" + encodeURIComponent(location.pathname + location.search));
        return;
      }
      if (!response || !response.ok) {
        failures += 1;
        const wait = Math.min(MAX_BACKOFF_MS, baseInterval * Math.pow(2, failures - 1));
        const why = response ? "the server answered " + response.status : "no answer from the server";
        connectionNotice("Connection lost (" + why + "): retrying in " + Math.round(wait / 1000) +
                         " s. What you see may be out of date.");
        later(wait);
        return;
      }
      let update;
      try {
        update = await response.json();
      } catch (error) {
        failures += 1;
        later(Math.min(MAX_BACKOFF_MS, baseInterval * Math.pow(2, failures - 1)));
        return;
      }
      if (failures) { failures = 0; connectionNotice(null); }
      apply(main, update);
      if (update.done) { main.dataset.pollDone = "true"; return; }
      if (update.interval) interval = update.interval;
      later(update.events && update.events.more ? 0 : interval); // a page that was away catches up at once
    }
    later(interval);
  }

  function initFilters() {
    for (const select of document.querySelectorAll("select[data-autosubmit]")) {
      select.addEventListener("change", () => select.form.submit());
    }
  }

  // The upload is sent by XMLHttpRequest, whose upload events give a progress bar; without script the form posts.
  function initUpload() {
    const form = document.getElementById("upload-form");
    if (!form || !window.XMLHttpRequest) return;
    const status = document.getElementById("upload-status");
    const bar = document.getElementById("upload-progress");
    const percent = document.getElementById("upload-percent");
    const problem = document.getElementById("upload-error");
    const button = form.querySelector("button[type=submit]");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      const request = new XMLHttpRequest();
      request.open("POST", form.action);
      request.upload.addEventListener("progress", (progress) => {
        if (!progress.lengthComputable) return;
        const value = Math.round((100 * progress.loaded) / progress.total);
        bar.value = value;
        bar.dataset.seen = (bar.dataset.seen ? bar.dataset.seen + "," : "") + value;
        percent.textContent = value === 100 ? "Uploaded; validating…" : value + " % uploaded";
      });
      request.addEventListener("load", () => {
        if (request.status >= 200 && request.status < 300) {
          window.location.assign(request.responseURL); // the file's page, where its validation report appears
          return;
        }
        const page = new DOMParser().parseFromString(request.responseText, "text/html");
        const message = page.getElementById("upload-error") || page.querySelector(".alert, main p");
        problem.textContent = message ? message.textContent.trim() : "The upload failed (" + request.status + ").";
        problem.hidden = false;
        status.hidden = true;
        button.disabled = false;
      });
      request.addEventListener("error", () => {
        problem.textContent = "The upload was interrupted: no answer from the server. Try again.";
        problem.hidden = false;
        status.hidden = true;
        button.disabled = false;
      });
      problem.hidden = true;
      bar.value = 0;
      bar.dataset.seen = "";
      percent.textContent = "0 % uploaded";
      status.hidden = false;
      button.disabled = true;
      request.send(new FormData(form));
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    initFilters();
    initChart();
    initUpload();
    const main = document.querySelector("main[data-poll]");
    if (main) startPolling(main);
  });
})();

// The status page: fetches JSON from api/ every few seconds and builds the page from it.
// Names come from people's files: they are only ever set with textContent, never as HTML.
"use strict";

const REFRESH_MS = 5000;
const PAGE = 25;
const state = { cursors: [""], next: null, timer: null };

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props || {})) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

async function getJSON(url) {
  const response = await fetch(url, { cache: "no-store" });
  if (!response.ok) throw new Error(`${url}: ${response.status}`);
  return response.json();
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "never";
  const s = Math.max(0, Math.round(seconds));
  if (s < 90) return `${s} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

function when(timestamp) {
  return timestamp ? new Date(timestamp * 1000).toLocaleString() : "";
}

function thumbnail(job, view, label) {
  if (!job.thumbnails) return el("div", { class: "nopic", text: "no picture" });
  return el("img", { src: `thumbs/${encodeURIComponent(job.id)}/${view}`, alt: label,
                     loading: "lazy", class: view });
}

// ----- inboxes ------------------------------------------------------------------------

function renderInboxes(inboxes) {
  const now = Date.now() / 1000;
  const cards = inboxes.map((inbox) => {
    const facts = el("dl", {});
    const add = (term, value, cls) => facts.append(el("dt", { text: term }),
                                                   el("dd", { text: value, class: cls || "" }));
    add("waiting", String(inbox.waiting));
    add("oldest waiting", inbox.waiting ? ago(inbox.oldest_waiting_s) : "—");
    add("images / min", String(inbox.images_per_min));
    add("intake", inbox.paused ? `paused: ${inbox.paused_why.join(", ")}` : "running",
        inbox.paused ? "paused" : "");
    add("last success", inbox.last_success ? `${ago(now - inbox.last_success)} ago` : "never");
    return el("div", { class: "inbox" }, el("h3", { text: inbox.name }), facts);
  });
  document.getElementById("inboxes").replaceChildren(...cards);
  const select = document.getElementById("f-inbox");
  const known = new Set([...select.options].map((o) => o.value));
  for (const inbox of inboxes) {
    if (!known.has(inbox.name)) select.append(el("option", { value: inbox.name, text: inbox.name }));
  }
}

// ----- jobs ---------------------------------------------------------------------------

function jobsQuery() {
  const params = new URLSearchParams({ limit: String(PAGE) });
  const inbox = document.getElementById("f-inbox").value;
  const outcome = document.getElementById("f-outcome").value;
  const name = document.getElementById("f-name").value;
  if (inbox) params.set("inbox", inbox);
  if (outcome) params.set("outcome", outcome);
  if (name) params.set("q", name);
  const before = state.cursors[state.cursors.length - 1];
  if (before) params.set("before", before);
  return `api/jobs?${params}`;
}

function facts(job) {
  const parts = [job.inbox];
  if (job.latency_s !== null) parts.push(`${Math.round(job.latency_s * 1000)} ms`);
  if (job.batch_size) parts.push(`batch of ${job.batch_size}`);
  if (job.device) parts.push(job.device);
  parts.push(when(job.claimed_at));
  return parts.join(" · ");
}

function outcomeText(job) {
  return job.outcome === "claimed" ? "in progress" : job.outcome;
}

function renderJob(job) {
  const link = el("a", { class: "name", href: `#job=${encodeURIComponent(job.id)}`,
                         text: job.path });
  const outcome = el("span", { class: `outcome outcome-${job.outcome}`, text: outcomeText(job) });
  const reason = job.outcome === "failed"
    ? el("span", { class: "reason", text: `${job.reason}: ${job.error || ""}` }) : null;
  const text = el("div", {}, link, el("div", { class: "facts" }, outcome,
                                       document.createTextNode(` · ${facts(job)}`)), reason);
  const row = el("div", { class: "job", "data-job": job.id, "data-outcome": job.outcome },
                 thumbnail(job, "before", "before"), thumbnail(job, "after", "after"), text);
  return row;
}

function renderJobs(page) {
  state.next = page.next;
  const rows = page.jobs.map(renderJob);
  if (!rows.length) rows.push(el("p", { class: "muted", text: "no jobs" }));
  document.getElementById("jobs").replaceChildren(...rows);
  document.getElementById("older").disabled = !page.next;
  document.getElementById("newer").disabled = state.cursors.length <= 1;
}

// ----- one job ------------------------------------------------------------------------

function figure(job, view, label) {
  return el("figure", {}, thumbnail(job, view, label), el("figcaption", { text: label }));
}

function renderDetail(job) {
  document.getElementById("d-name").textContent = job.path;
  const pictures = job.thumbnails
    ? [figure(job, "before-large", "before"), figure(job, "after-large", "after"),
       figure(job, "mask-large", "mask")]
    : [el("p", { class: "muted", text: "no pictures for this job" })];
  if (job.outcome === "failed") {
    pictures.unshift(el("p", { class: "reason", text: `${job.reason}: ${job.error || ""}` }));
  }
  document.getElementById("d-pictures").replaceChildren(...pictures);
  const outputs = job.outputs.map((o) => el("li", {
    text: `${o.name} (${o.size === null ? "gone" : `${o.size.toLocaleString()} bytes`})` }));
  if (!outputs.length) outputs.push(el("li", { class: "muted", text: "none" }));
  document.getElementById("d-outputs").replaceChildren(...outputs);
  const shown = (key, value) => {
    if (value === null) return "";
    if (typeof value === "object") return JSON.stringify(value);
    if (key.endsWith("_at")) return `${value} (${when(value)})`;
    return String(value);
  };
  const rows = Object.entries(job.row).map(([key, value]) => el("tr", {},
    el("th", { text: key }), el("td", { text: shown(key, value) })));
  document.getElementById("d-row").replaceChildren(...rows);
}

// ----- refresh ------------------------------------------------------------------------

function selectedJob() {
  const match = /^#job=([0-9a-f]{32})$/.exec(location.hash);
  return match ? match[1] : null;
}

async function refresh() {
  clearTimeout(state.timer);
  const job = selectedJob();
  document.getElementById("overview").hidden = Boolean(job);
  document.getElementById("detail").hidden = !job;
  try {
    if (job) {
      renderDetail(await getJSON(`api/jobs/${job}`));
    } else {
      const [inboxes, page] = await Promise.all([getJSON("api/inboxes"), getJSON(jobsQuery())]);
      renderInboxes(inboxes);
      renderJobs(page);
    }
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (error) {
    document.getElementById("updated").textContent = `cannot reach the daemon (${error.message})`;
  }
  state.timer = setTimeout(refresh, REFRESH_MS);
}

function restart() {
  state.cursors = [""];
  refresh();
}

document.getElementById("f-inbox").addEventListener("change", restart);
document.getElementById("f-outcome").addEventListener("change", restart);
document.getElementById("f-name").addEventListener("input", restart);
document.getElementById("filters").addEventListener("submit", (event) => event.preventDefault());
document.getElementById("older").addEventListener("click", () => {
  if (state.next) state.cursors.push(state.next);
  refresh();
});
document.getElementById("newer").addEventListener("click", () => {
  if (state.cursors.length > 1) state.cursors.pop();
  refresh();
});
window.addEventListener("hashchange", refresh);
refresh();

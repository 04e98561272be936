// The annotation page: fetch the next task from the JSON API, show it, submit the answer.
// Model outputs are untrusted: they only ever reach the page as text nodes (textContent),
// never as HTML.
"use strict";
(function () {
  const section = document.getElementById("task");
  const status = document.getElementById("status");
  const doneCount = document.getElementById("done-count");
  const projectId = section.dataset.project;
  const annotator = section.dataset.annotator;
  const { currentCsrf, draftKey, readDraft, writeDraft, dropDrafts } = window.rlhfkit;
  let csrf = document.querySelector('meta[name="csrf-token"]').content;
  let done = Number(doneCount.textContent) || 0;

  // Build an element; children that are strings become text nodes.
  function el(tag, props, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(props || {})) {
      if (key === "dataset") Object.assign(node.dataset, value);
      else if (key in node) node[key] = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child === null || child === undefined) continue;
      node.append(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  async function post(path, body, retried = false) {
    const response = await fetch(path, {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
      body: JSON.stringify(body || {}),
    });
    const data = await response.json().catch(() => ({}));
    if (response.status === 403 && !retried && await refreshCsrf()) return post(path, body, true);
    if (!response.ok) {
      const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail);
      const error = new Error(detail || `HTTP ${response.status}`);
      error.status = response.status;
      throw error;
    }
    return data;
  }

  // After logging in again elsewhere the session has a new CSRF token; take it, so that what the
  // annotator typed on this page can still be submitted.
  async function refreshCsrf() {
    const fresh = await currentCsrf();
    if (!fresh || fresh === csrf) return false;
    csrf = fresh;
    return true;
  }

  function promptView(task) {
    if (task.messages) {
      return el("div", { className: "conversation" },
        ...task.messages.map((m) =>
          el("div", { className: `message role-${m.role}` },
            el("span", { className: "role" }, m.role), el("div", { className: "content", dir: "auto" }, m.content))));
    }
    return el("div", { className: "prompt" }, el("span", { className: "role" }, "prompt"),
      el("div", { className: "content", dir: "auto" }, task.prompt));
  }

  // dir="auto": a right-to-left output reads right to left, whatever the page's direction.
  function responseView(text, title) {
    return el("div", { className: "response" }, el("h3", {}, title), el("div", { className: "text", dir: "auto" }, text));
  }

  // A draft belongs to one task: this annotator, one item, shown in one order. The task's token
  // stands for all three, and the same task (same token) comes back while its lease is held.
  function taskDraftKey(task) {
    return draftKey(annotator, projectId, task.token);
  }

  // When a task of this project loads, the project's other drafts are of tasks whose lease ended
  // (an annotator holds one per project), and other annotators' are of whoever used this tab
  // before: neither may reach this task.
  function dropOtherDrafts(key) {
    const own = draftKey(annotator, "");
    const thisProject = draftKey(annotator, projectId, "");
    dropDrafts((other) => other !== key && (!other.startsWith(own) || other.startsWith(thisProject)));
  }

  function setBusy(busy) {
    for (const control of section.querySelectorAll("button, textarea, input")) control.disabled = busy;
  }

  function setStatus(failed, ...parts) {
    status.classList.toggle("error", failed);
    status.replaceChildren(...parts);
  }

  async function submit(task, answer) {
    const focused = document.activeElement;  // disabling it below takes the focus away
    setBusy(true);
    setStatus(false, "Saving…");
    try {
      await post("/api/submit", { token: task.token, answer });
      dropDrafts((key) => key === taskDraftKey(task));
    } catch (error) {
      if (error.status === 401) {
        setStatus(true, "Not saved: you are logged out. ",
          el("a", { href: "/login", target: "_blank", rel: "noopener" }, "Log in again"),
          " (in a new tab), then submit again; your answer stays on this page.");
      } else {
        setStatus(true, `Not saved: ${error.message}`);
      }
      setBusy(false);
      if (section.contains(focused)) focused.focus();
      return;
    }
    done += 1;
    doneCount.textContent = String(done);
    setStatus(false, "Saved.");
    await load();
    // Into the new task (its text box, if it has one), not back to the top of the page.
    (section.querySelector("textarea") || section).focus();
  }

  // Each view below shows a task with its draft (null when there is none) filled in, and calls
  // keep(draft) whenever the annotator changes an answer that is not submitted yet.
  function comparison(task, draft, keep) {
    const start = ["1", "2", "3"].includes(String(draft?.strength)) ? String(draft.strength) : "1";
    const chosenStrength = () => Number(section.querySelector('input[name="strength"]:checked').value);
    const strength = el("fieldset", { className: "strength", onchange: () => keep({ strength: chosenStrength() }) },
      el("legend", {}, "How much better?"),
      ...[["1", "slightly"], ["2", "clearly"], ["3", "much"]].map(([value, text]) =>
        el("label", {}, el("input", { type: "radio", name: "strength", value, checked: value === start }), ` ${text}`)));
    const choose = (choice) => submit(task, { choice, strength: choice === "tie" ? 1 : chosenStrength() });
    return [
      el("div", { className: "pair" }, responseView(task.responses[0], "A"), responseView(task.responses[1], "B")),
      strength,
      el("div", { className: "actions" },
        el("button", { id: "choose-left", onclick: () => choose("left") }, "A is better"),
        el("button", { id: "choose-tie", onclick: () => choose("tie") }, "Tie"),
        el("button", { id: "choose-right", onclick: () => choose("right") }, "B is better")),
    ];
  }

  // The shown positions in the draft's order when it has each of them once, else as shown.
  function startOrder(n, saved) {
    const shown = [...Array(n).keys()];
    const valid = Array.isArray(saved) && saved.length === n && shown.every((p) => saved.includes(p));
    return valid ? saved : shown;
  }

  function ranking(task, draft, keep) {
    const list = el("ol", { id: "ranking", className: "ranking" });
    const order = () => [...list.children].map((li) => Number(li.dataset.position));
    const moved = () => keep({ ranking: order() });
    let dragged = null;
    startOrder(task.responses.length, draft?.ranking).forEach((position) => {
      const item = el("li", { tabIndex: 0, draggable: true, className: "rank-item", dataset: { position: String(position) } },
        el("span", { className: "grip", "aria-hidden": "true" }, "⠿"),
        el("div", { className: "text", dir: "auto" }, task.responses[position]));
      item.addEventListener("keydown", (event) => {
        // Keyboard ranking: arrow keys move the focused response up or down.
        if (event.key === "ArrowUp" && item.previousElementSibling) {
          list.insertBefore(item, item.previousElementSibling);
        } else if (event.key === "ArrowDown" && item.nextElementSibling) {
          list.insertBefore(item.nextElementSibling, item);
        } else {
          return;
        }
        event.preventDefault();
        item.focus();
        moved();
      });
      item.addEventListener("dragstart", () => { dragged = item; item.classList.add("dragging"); });
      item.addEventListener("dragend", () => { dragged = null; item.classList.remove("dragging"); });
      item.addEventListener("dragover", (event) => event.preventDefault());
      item.addEventListener("drop", (event) => {
        event.preventDefault();
        if (!dragged || dragged === item) return;
        const after = [...list.children].indexOf(dragged) < [...list.children].indexOf(item);
        list.insertBefore(dragged, after ? item.nextElementSibling : item);
        moved();
      });
      list.append(item);
    });
    return [
      el("p", { className: "muted" }, "Best first. Drag the responses, or focus one (Tab) and move it with ↑ / ↓."),
      list,
      el("div", { className: "actions" }, el("button", { id: "submit-ranking", onclick: () => submit(task, { ranking: order() }) }, "Submit ranking")),
    ];
  }

  function likert(task) {
    const labels = { 1: "very bad", 4: "neutral", 7: "very good" };
    return [
      responseView(task.responses[0], "Response"),
      el("div", { className: "actions likert", role: "group", "aria-label": "rating from 1 to 7" },
        ...[1, 2, 3, 4, 5, 6, 7].map((n) =>
          el("button", { className: "rating", dataset: { rating: String(n) }, title: labels[n] || "", onclick: () => submit(task, { rating: n }) }, String(n)))),
      el("p", { className: "muted" }, "1 = very bad · 4 = neutral · 7 = very good"),
    ];
  }

  function binary(task) {
    return [
      responseView(task.responses[0], "Response"),
      el("div", { className: "actions" },
        el("button", { id: "thumbs-up", onclick: () => submit(task, { label: true }) }, "👍 Good"),
        el("button", { id: "thumbs-down", onclick: () => submit(task, { label: false }) }, "👎 Bad")),
    ];
  }

  function textTask(task, editing, draft, keep) {
    const start = typeof draft?.text === "string" ? draft.text : editing ? task.responses[0] : "";
    const area = el("textarea", { id: "answer-text", rows: 10, dir: "auto", value: start,
      oninput: () => keep({ text: area.value }) });
    return [
      editing ? responseView(task.responses[0], "Original response") : null,
      el("label", {}, editing ? "Your improved response" : "Your response", area),
      el("div", { className: "actions" },
        el("button", { id: "submit-text", onclick: () => submit(task, { text: area.value }) }, "Submit")),
    ];
  }

  const VIEWS = {
    comparison,
    ranking,
    likert,
    binary,
    edit: (task, draft, keep) => textTask(task, true, draft, keep),
    demonstration: (task, draft, keep) => textTask(task, false, draft, keep),
  };

  async function load() {
    try {
      const { task } = await post(`/api/projects/${projectId}/next`);
      if (!task) {
        dropOtherDrafts(null);
        section.replaceChildren(el("p", { id: "all-done" }, "No more tasks in this project. Thank you!"));
        return;
      }
      const key = taskDraftKey(task);
      dropOtherDrafts(key);
      const draft = readDraft(key);
      const keep = (changed) => writeDraft(key, changed);
      section.replaceChildren(promptView(task), ...VIEWS[task.task_type](task, draft, keep).filter(Boolean));
      section.dataset.token = task.token;
      if (draft) setStatus(false, "Restored your answer to this task; it is not submitted yet.");
    } catch (error) {
      section.replaceChildren(el("p", { className: "error" }, `Could not load a task: ${error.message}`));
    }
  }

  load();
})();

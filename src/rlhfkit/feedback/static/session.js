// What every page does with the session: fetch its current CSRF token, keep the annotator's
// drafts, and log out (forgetting the drafts). Loaded in the head of every page, before the
// page's own script, which uses window.rlhfkit.
"use strict";
(function () {
  // Drafts are answers typed or chosen but not submitted yet, kept so that a reload loses nothing.
  // sessionStorage, not localStorage: they stay in this tab and go when it closes, and a logout
  // removes them, so the next person on this browser never sees them.
  const DRAFTS = "rlhfkit-draft:";

  // The key of a draft; its parts (annotator, project, task token) contain no ":".
  function draftKey(...parts) {
    return DRAFTS + parts.join(":");
  }

  // Storage can be switched off or full: then there are no drafts, and nothing else breaks.
  function readDraft(key) {
    try {
      return JSON.parse(sessionStorage.getItem(key));
    } catch {
      return null;
    }
  }

  function writeDraft(key, value) {
    try {
      sessionStorage.setItem(key, JSON.stringify(value));
    } catch {
      // not kept: only a reload would lose it
    }
  }

  // Remove the drafts whose key `which` picks (all of them by default).
  function dropDrafts(which = () => true) {
    try {
      for (const key of Object.keys(sessionStorage)) {
        if (key.startsWith(DRAFTS) && which(key)) sessionStorage.removeItem(key);
      }
    } catch {
      // no storage, no drafts
    }
  }

  // Logging in again (in another tab, after the session ended) gives the session a new CSRF
  // token, and a page from before holds the old one. /api/me tells the current one; null when
  // logged out. (Another site cannot read this answer, so the token stays secret.)
  async function currentCsrf() {
    const response = await fetch("/api/me", { credentials: "same-origin" }).catch(() => null);
    return response && response.ok ? (await response.json().catch(() => ({}))).csrf_token || null : null;
  }

  // A Log out button on a page from before such a login would be refused (403): the form takes
  // the current token first. Logged out already, it goes as it is, and the server sends the
  // user to the login page.
  async function logOut(form) {
    dropDrafts();
    const fresh = await currentCsrf();
    if (fresh) form.elements.csrf_token.value = fresh;
    form.submit();  // (no submit event: this handler does not run again)
  }

  document.addEventListener("submit", (event) => {
    const form = event.target;
    if (!form.matches('form[action="/logout"]')) return;
    event.preventDefault();
    logOut(form);
  });

  window.rlhfkit = Object.freeze({ currentCsrf, draftKey, readDraft, writeDraft, dropDrafts });
})();

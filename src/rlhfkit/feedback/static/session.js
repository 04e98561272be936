// What every page does with the session: fetch its current CSRF token, and log out with it.
// Loaded in the head of every page, before the page's own script, which uses window.rlhfkit.
"use strict";
(function () {
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

  window.rlhfkit = Object.freeze({ currentCsrf });
})();

// Copy buttons: <button data-copy="ID"> copies the text of the element with that id, and says so
// in the page's #copy-status live region.
"use strict";
(function () {
  const status = document.getElementById("copy-status");

  function select(node) {
    const range = document.createRange();
    range.selectNodeContents(node);
    const selection = window.getSelection();
    selection.removeAllRanges();
    selection.addRange(range);
  }

  // The clipboard API exists only in secure contexts (HTTPS or localhost): a service reached over
  // plain http on a LAN address has none. There the text is selected, and copied the old way.
  async function copy(node) {
    const text = node.textContent.trim();
    if (navigator.clipboard && navigator.clipboard.writeText) {
      try {
        await navigator.clipboard.writeText(text);
        return "Copied";
      } catch {
        // refused (no permission, page not focused): fall back to the selection
      }
    }
    select(node);
    return document.execCommand("copy") ? "Copied" : "Selected: press Ctrl+C (⌘C on a Mac) to copy";
  }

  for (const button of document.querySelectorAll("button[data-copy]")) {
    button.addEventListener("click", async () => {
      const node = document.getElementById(button.dataset.copy);
      if (!node) return;
      status.textContent = "";  // emptied first, so that copying again is announced again
      status.textContent = await copy(node);
    });
  }
})();

"""The annotation UI in Debian's Chromium, the way annotators and admins use it.

Keyboard-only work and where focus goes, failed submissions that must keep what was typed,
long and right-to-left model outputs, a phone-width screen, and labelled form controls.
"""

from __future__ import annotations

import pytest
from feedback_server import running_server

from rlhfkit.feedback.store import FeedbackStore

pytestmark = pytest.mark.browser
HEBREW = "שלום עולם! 1. תפוח 2. בננה"
TOKEN = "x" * 3000  # one unbroken "word"
GUIDELINES = "# Guide\n\n```\n" + "z" * 400 + "\n```\n\n" + "w" * 600 + "\n"
SIDEWAYS = "() => document.documentElement.scrollWidth - document.documentElement.clientWidth"
FOCUSED = "() => document.activeElement && (document.activeElement.id || document.activeElement.tagName)"
IN_TASK = "() => document.getElementById('task').contains(document.activeElement)"


@pytest.fixture
def ui_store(tmp_path):
    """An admin, an annotator and a project of every task type, with awkward model outputs."""
    store = FeedbackStore(tmp_path / "feedback.db", seed=0, durable=False)
    store.add_user("root", "admin", "root-password")
    store.add_user("alice", "annotator", "alice-password")
    ids = {t: store.create_project(t, t, GUIDELINES) for t in ("comparison", "ranking", "likert", "edit")}
    ids["demonstration"] = store.create_project("demonstration", "demonstration", GUIDELINES)
    pair = {"prompt": HEBREW, "responses": [HEBREW, TOKEN]}
    store.add_items(ids["comparison"], [pair, {"prompt": "second", "responses": ["a", "b"]}])
    store.add_items(ids["ranking"], [{"prompt": "p", "responses": ["one", "two", "three"]}])
    store.add_items(
        ids["likert"], [{"prompt": "p", "responses": [TOKEN]}, {"prompt": "q", "responses": ["r"]}]
    )
    store.add_items(ids["edit"], [{"prompt": "p", "responses": [HEBREW]}])
    store.add_items(ids["demonstration"], [{"prompt": "first"}, {"prompt": "second"}])
    yield store, ids
    store.close()


def _login(page, url, name, password):
    page.goto(f"{url}/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password)
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/")


def _open_task(page, url, project_id, ready):
    """Log in as alice and open a project's annotation page, until `ready` (a selector) shows."""
    _login(page, url, "alice", "alice-password")
    page.goto(f"{url}/projects/{project_id}/annotate")
    page.wait_for_selector(ready)


def _server_errors(page):
    """Console errors other than the 4xx/5xx or failed requests a test provoked on purpose."""
    return [e for e in page.console_errors if not e.startswith("Failed to load resource")]


def test_keyboard_only_focus_lands_in_the_next_task(page, ui_store):
    store, ids = ui_store
    with running_server(store) as url:
        _open_task(page, url, ids["comparison"], "#choose-left")
        page.focus("input[name=strength][value='1']")
        page.keyboard.press("ArrowRight")  # strength: clearly
        page.keyboard.press("Tab")
        assert page.evaluate(FOCUSED) == "choose-left"
        page.keyboard.press("Enter")
        page.wait_for_selector("#done-count:text-is('1')")
        page.wait_for_selector("#choose-left:enabled")
        # Focus is in the new task, so Tab goes on to its controls, not back to the page's top.
        assert page.evaluate(IN_TASK)
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.name") == "strength"

        # A text task: after a submit the annotator can type the next answer straight away.
        page.goto(f"{url}/projects/{ids['demonstration']}/annotate")
        page.wait_for_selector("#answer-text")
        page.focus("#answer-text")
        page.keyboard.type("1. Kyoto")
        page.keyboard.press("Tab")
        page.keyboard.press("Enter")
        page.wait_for_selector("#done-count:text-is('1')")
        page.wait_for_selector("#answer-text:enabled")
        assert page.evaluate(FOCUSED) == "answer-text"
        page.keyboard.type("1. Osaka")
        assert page.input_value("#answer-text") == "1. Osaka"
        assert not page.console_errors
    assert [label.value for label in store.labels(ids["demonstration"])] == [{"text": "1. Kyoto"}]
    assert store.labels(ids["comparison"])[0].strength == 2


def test_a_failed_submit_says_so_and_keeps_the_text_and_the_focus(page, ui_store):
    store, ids = ui_store
    with running_server(store) as url:
        _open_task(page, url, ids["demonstration"], "#answer-text")
        page.fill("#answer-text", "1. Kyoto\n2. Nara")
        failures = [
            lambda route: route.abort(),  # the network is down
            lambda route: route.fulfill(status=500, body="Internal Server Error", content_type="text/plain"),
            lambda route: route.fulfill(status=502, body="<h1>Bad gateway</h1>", content_type="text/html"),
        ]
        for failure in failures:
            page.route("**/api/submit", failure)
            page.focus("#submit-text")
            page.keyboard.press("Enter")
            page.wait_for_selector("#submit-text:enabled")
            assert page.inner_text("#status").startswith("Not saved:")
            assert "error" in page.get_attribute("#status", "class")
            assert page.input_value("#answer-text") == "1. Kyoto\n2. Nara"
            # Back on the button, so Enter tries again.
            assert page.evaluate(FOCUSED) == "submit-text"
            page.unroute("**/api/submit")
        page.keyboard.press("Enter")
        page.wait_for_selector("#done-count:text-is('1')")
        assert page.inner_text("#status") == "Saved."
        assert "error" not in page.get_attribute("#status", "class")
        assert not _server_errors(page)
    assert [label.value for label in store.labels(ids["demonstration"])] == [{"text": "1. Kyoto\n2. Nara"}]


def test_text_typed_before_the_session_changed_can_still_be_submitted(browser, ui_store):
    store, ids = ui_store
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page, other = context.new_page(), context.new_page()
    with running_server(store) as url:
        _open_task(page, url, ids["edit"], "#answer-text")
        page.fill("#answer-text", "a long edit that took a while")
        # The session ends (logged out in another tab, or expired) before the annotator submits.
        other.goto(f"{url}/")
        other.click("text=Log out")
        other.wait_for_url(f"{url}/login")
        page.click("#submit-text")
        page.wait_for_selector("#submit-text:enabled")
        assert "log in again" in page.inner_text("#status").lower()
        assert page.get_attribute("#status a", "href") == "/login"
        assert page.input_value("#answer-text") == "a long edit that took a while"
        # Logged in again elsewhere: this page's answer goes through with the new session.
        _login(other, url, "alice", "alice-password")
        page.click("#submit-text")
        page.wait_for_selector("#all-done")
    context.close()
    assert [label.value for label in store.labels(ids["edit"])] == [{"text": "a long edit that took a while"}]


def test_reading_the_guidelines_mid_task_keeps_the_typed_text(page, ui_store):
    store, ids = ui_store
    with running_server(store) as url:
        _open_task(page, url, ids["demonstration"], "#answer-text")
        page.fill("#answer-text", "half of my answer")
        with page.context.expect_page(timeout=5000) as opened:
            page.click("a[href$='/guidelines']")
        guidelines = opened.value
        guidelines.wait_for_load_state()
        assert guidelines.inner_text("article.guidelines h1") == "Guide"
        assert page.input_value("#answer-text") == "half of my answer"


def test_progress_counts_the_annotators_own_labels_across_reloads(page, ui_store):
    store, ids = ui_store
    with running_server(store) as url:
        _open_task(page, url, ids["likert"], "button.rating")
        assert page.inner_text("#done-count") == "0"
        page.click("button.rating[data-rating='5']")
        page.wait_for_selector("#done-count:text-is('1')")
        page.reload()
        page.wait_for_selector("button.rating")
        assert page.inner_text("#done-count") == "1"
        page.click("button.rating[data-rating='3']")
        page.wait_for_selector("#all-done")
        assert page.inner_text("#done-count") == "2"


def test_right_to_left_outputs_read_right_to_left(page, ui_store):
    store, ids = ui_store
    with running_server(store) as url:
        _open_task(page, url, ids["comparison"], ".pair .text")
        direction = "(el) => getComputedStyle(el).direction"
        texts = page.locator(".pair .text")
        hebrew = 0 if page.inner_text(".pair .response:nth-child(1) .text") == HEBREW else 1
        assert texts.nth(hebrew).evaluate(direction) == "rtl"
        assert texts.nth(1 - hebrew).evaluate(direction) == "ltr"
        assert page.locator(".prompt .content").evaluate(direction) == "rtl"
        page.goto(f"{url}/projects/{ids['edit']}/annotate")
        page.wait_for_selector("#answer-text")
        assert page.locator("#answer-text").evaluate(direction) == "rtl"
        assert page.locator(".response .text").evaluate(direction) == "rtl"


def test_ranking_shows_each_responses_place(page, ui_store):
    store, ids = ui_store
    with running_server(store) as url:
        _open_task(page, url, ids["ranking"], ".rank-item")
        marker = "(el) => getComputedStyle(el, '::before').content"
        assert "counter(" in page.locator(".rank-item").first.evaluate(marker)


@pytest.mark.parametrize("who", ["alice", "root"])
def test_pages_fit_a_phone_without_sideways_scrolling(browser, screenshot_dir, ui_store, who):
    store, ids = ui_store
    context = browser.new_context(viewport={"width": 375, "height": 740})
    page = context.new_page()
    errors = []
    page.on("console", lambda msg: msg.type == "error" and errors.append(msg.text))
    with running_server(store) as url:
        _login(page, url, who, f"{who}-password")
        if who == "root":
            # An annotator row on the dashboard, and a name as long as names may be.
            store.add_user("a" * 200, "annotator", "long-name-password")
            page.goto(f"{url}/projects/{ids['likert']}/annotate")
            page.click("button.rating[data-rating='4']")
            page.wait_for_selector("#done-count:text-is('1')")
        paths = ["/", f"/projects/{ids['comparison']}/guidelines"]
        paths += [f"/projects/{pid}/annotate" for pid in ids.values()]
        if who == "root":
            paths += ["/admin", "/admin/projects/new"]
        for path in paths:
            page.goto(url + path)
            page.wait_for_load_state("networkidle")
            assert page.evaluate(SIDEWAYS) <= 0, path
        if who == "root":
            page.goto(f"{url}/admin")
            page.screenshot(path=str(screenshot_dir / "phone-dashboard.png"), full_page=True)
            page.click("form[action='/admin/invites'] button")
            page.wait_for_selector("#invite-url")
            assert page.evaluate(SIDEWAYS) <= 0, "invite"
        else:
            page.goto(f"{url}/projects/{ids['comparison']}/annotate")
            page.wait_for_selector(".pair")
            # A above B, each as wide as the screen allows and still labelled, nothing sideways.
            a, b = (page.locator(".pair .response").nth(i) for i in (0, 1))
            assert [a.locator("h3").inner_text(), b.locator("h3").inner_text()] == ["A", "B"]
            box_a, box_b = a.bounding_box(), b.bounding_box()
            assert box_b["y"] >= box_a["y"] + box_a["height"]
            assert box_a["x"] == box_b["x"] and box_a["width"] == box_b["width"] > 375 / 2
            assert box_a["x"] >= 0 and box_a["x"] + box_a["width"] <= 375
            assert page.evaluate(SIDEWAYS) <= 0
            page.screenshot(path=str(screenshot_dir / "phone-comparison.png"), full_page=True)
    context.close()
    assert not errors


def test_guidelines_code_blocks_scroll_inside_the_page(page, ui_store):
    store, ids = ui_store
    with running_server(store) as url:
        _login(page, url, "alice", "alice-password")
        page.goto(f"{url}/projects/{ids['comparison']}/guidelines")
        assert page.evaluate(SIDEWAYS) <= 0
        assert "z" * 400 in page.inner_text("article.guidelines pre")


def _unnamed_controls(page):
    """Roles of the page's focusable or form controls that have no accessible name."""
    nodes = page.context.new_cdp_session(page).send("Accessibility.getFullAXTree")["nodes"]
    controls = {"button", "textbox", "combobox", "radio", "checkbox", "spinbutton", "link", "slider"}
    return [
        node["role"]["value"]
        for node in nodes
        if not node.get("ignored")
        and node.get("role", {}).get("value") in controls
        and not str(node.get("name", {}).get("value", "")).strip()
    ]


def test_every_form_control_has_an_accessible_name(page, ui_store):
    store, ids = ui_store
    with running_server(store) as url:
        page.goto(f"{url}/login")
        assert _unnamed_controls(page) == []
        _login(page, url, "root", "root-password")
        page.goto(f"{url}/projects/{ids['likert']}/annotate")
        page.click("button.rating[data-rating='2']")
        page.wait_for_selector("#done-count:text-is('1')")
        paths = ["/", "/admin", "/admin/projects/new"] + [f"/projects/{pid}/annotate" for pid in ids.values()]
        for path in paths:
            page.goto(url + path)
            page.wait_for_load_state("networkidle")
            assert _unnamed_controls(page) == [], path
        page.goto(f"{url}/admin")
        assert page.get_by_label("Invite link for").evaluate("el => el.tagName") == "SELECT"


def test_a_refused_new_project_keeps_what_the_admin_typed(page, ui_store):
    # A leading line break is the one a text box's HTML drops unless the page adds one.
    typed = "\nRank by **helpfulness**.\n\n<b>not html</b>"
    store, ids = ui_store
    with running_server(store) as url:
        _login(page, url, "root", "root-password")
        page.goto(f"{url}/admin/projects/new")
        page.fill("input[name=name]", "likert")  # taken
        page.select_option("select[name=task_type]", "ranking")
        page.fill("input[name=overlap]", "3")
        page.fill("textarea[name=guidelines]", typed)
        page.click("form[action='/admin/projects'] button[type=submit]")
        page.wait_for_selector(".error")
        assert "exists" in page.inner_text(".error")
        assert page.input_value("input[name=name]") == "likert"
        assert page.input_value("select[name=task_type]") == "ranking"
        assert page.input_value("input[name=overlap]") == "3"
        assert page.input_value("textarea[name=guidelines]") == typed
        page.fill("input[name=name]", "ranking by helpfulness")
        page.click("form[action='/admin/projects'] button[type=submit]")
        page.wait_for_url(f"{url}/admin")
        assert not _server_errors(page)  # (the refused form came back as a 400)
    (project,) = [p for p in store.projects() if p.name == "ranking by helpfulness"]
    assert (project.task_type, project.overlap) == ("ranking", 3)
    # (a browser sends a text box's line breaks as CRLF)
    assert project.guidelines.replace("\r\n", "\n") == typed


def test_exclude_buttons_name_the_annotator(page, ui_store):
    store, ids = ui_store
    store.add_user("bob", "annotator", "bob-password")
    for user in store.users():
        if user.name in ("alice", "bob"):
            task = store.next_task(ids["likert"], user.annotator_id)
            store.submit(task.token, user.annotator_id, {"rating": 4})
    with running_server(store) as url:
        _login(page, url, "root", "root-password")
        page.goto(f"{url}/admin")
        project = page.locator(f"#project-{ids['likert']}")
        # A screen reader user tabbing through the buttons hears whose labels each one excludes.
        bob = project.get_by_role("button", name="Exclude bob", exact=True)
        assert bob.inner_text() == "Exclude"
        with page.expect_navigation():
            bob.click()
        assert store.excluded_annotators() == ["bob"]
        include_bob = project.get_by_role("button", name="Include again: bob", exact=True)
        assert include_bob.inner_text() == "Include again"
        assert project.get_by_role("button", name="Exclude alice", exact=True).count() == 1


def test_an_invite_link_copies_with_one_click(page, ui_store):
    store, _ = ui_store
    with running_server(store) as url:
        page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=url)
        _login(page, url, "root", "root-password")
        page.goto(f"{url}/admin")
        page.click("form[action='/admin/invites'] button")
        link = page.inner_text("#invite-url")
        assert page.get_attribute("#copy-status", "role") == "status"  # polite: said after what is being read
        page.get_by_role("button", name="Copy the invite link").click()
        page.wait_for_selector("#copy-status:text-is('Copied')")
        assert page.evaluate("navigator.clipboard.readText()") == link
        # Served over plain http on a LAN address, a page has no clipboard API: the link is selected instead.
        page.evaluate(
            "() => { Object.defineProperty(navigator, 'clipboard', {value: undefined});"
            " document.getElementById('copy-status').textContent = ''; }"
        )
        page.get_by_role("button", name="Copy the invite link").click()
        page.wait_for_selector("#copy-status:not(:empty)")
        assert page.evaluate("getSelection().toString()") == link
        assert page.inner_text("#copy-status") == "Copied"
        assert not page.console_errors


def _log_out_and_in_elsewhere(other, url, name, log_in_again=True):
    """In another tab: log out (the session ends) and, by default, log in again (a new CSRF token)."""
    other.goto(f"{url}/")
    other.click("text=Log out")
    other.wait_for_url(f"{url}/login")
    if log_in_again:
        _login(other, url, name, f"{name}-password")


def test_a_stale_log_out_button_still_logs_out(browser, ui_store):
    store, _ = ui_store
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page, other = context.new_page(), context.new_page()
    with running_server(store) as url:
        _login(page, url, "alice", "alice-password")
        _log_out_and_in_elsewhere(other, url, "alice")
        page.click("text=Log out")
        page.wait_for_url(f"{url}/login")
        assert page.request.get(f"{url}/api/me").status == 401  # the new session is the one that ended
        # Logged out elsewhere and not in again: there is nothing to end, and the button says so by
        # going to the login page.
        _login(page, url, "alice", "alice-password")
        _log_out_and_in_elsewhere(other, url, "alice", log_in_again=False)
        page.click("text=Log out")
        page.wait_for_url(f"{url}/login")
        # A POST without the session's token (from another site, say) still logs nobody out.
        _login(page, url, "alice", "alice-password")
        assert page.request.post(f"{url}/logout").status == 403
        assert page.request.post(f"{url}/logout", form={"csrf_token": "forged"}).status == 403
        assert page.request.get(f"{url}/api/me").status == 200
    context.close()

    # Without JavaScript a stale button cannot fetch the new token: the refusal is a page whose own
    # Log out button carries it.
    context = browser.new_context(viewport={"width": 1280, "height": 900}, java_script_enabled=False)
    page, other = context.new_page(), context.new_page()
    with running_server(store) as url:
        _login(page, url, "alice", "alice-password")
        _log_out_and_in_elsewhere(other, url, "alice")
        with page.expect_navigation():
            page.click("text=Log out")
        assert "out of date" in page.inner_text(".error")
        page.click("text=Log out")
        page.wait_for_url(f"{url}/login")
        assert page.request.get(f"{url}/api/me").status == 401
    context.close()


DRAFTS = "() => Object.keys(sessionStorage).filter((key) => key.startsWith('rlhfkit-draft:')).sort()"


def test_a_draft_survives_a_reload_of_its_own_task_only(page, ui_store):
    store, ids = ui_store
    with running_server(store) as url:
        _login(page, url, "alice", "alice-password")
        annotate = {key: f"{url}/projects/{pid}/annotate" for key, pid in ids.items()}
        # Typed text, a chosen strength and a reordered ranking: none of them submitted yet.
        page.goto(annotate["demonstration"])
        page.wait_for_selector("#answer-text")
        prompt = page.inner_text(".prompt .content")
        page.fill("#answer-text", "1. Kyoto\n2. Nara")
        page.goto(annotate["comparison"])
        page.check("input[name=strength][value='3']")
        page.goto(annotate["ranking"])
        page.focus(".rank-item >> nth=0")
        page.keyboard.press("ArrowDown")
        ranked = page.locator(".rank-item .text").all_inner_texts()
        page.reload()
        page.wait_for_selector(".rank-item")
        assert page.locator(".rank-item .text").all_inner_texts() == ranked
        page.goto(annotate["comparison"])
        page.wait_for_selector(".pair")
        assert page.is_checked("input[name=strength][value='3']")
        page.goto(annotate["demonstration"])
        page.wait_for_selector("#answer-text")
        assert page.inner_text(".prompt .content") == prompt  # the same task, its lease still held
        assert page.input_value("#answer-text") == "1. Kyoto\n2. Nara"
        assert "not submitted yet" in page.inner_text("#status")
        # Kept in this tab's sessionStorage, under the annotator's name, never in localStorage.
        assert page.evaluate("() => localStorage.length") == 0
        keys = page.evaluate(DRAFTS)
        assert len(keys) == 3 and all(key.startswith("rlhfkit-draft:alice:") for key in keys)

        # Never into another task: a draft of a task whose lease ended, or another annotator's
        # draft of this very task, is dropped, not restored.
        (key,) = [key for key in keys if key.startswith(f"rlhfkit-draft:alice:{ids['demonstration']}:")]
        page.evaluate(
            """(key) => {
                const draft = sessionStorage.getItem(key);
                sessionStorage.removeItem(key);
                sessionStorage.setItem(key.replace(/:[^:]*$/, ':an-ended-lease'), draft);
                sessionStorage.setItem(key.replace('rlhfkit-draft:alice:', 'rlhfkit-draft:bob:'), draft);
            }""",
            key,
        )
        page.reload()
        page.wait_for_selector("#answer-text")
        assert page.input_value("#answer-text") == ""
        assert page.inner_text("#status") == ""
        assert page.evaluate(DRAFTS) == [k for k in keys if k != key]

        # A submitted answer leaves no draft behind, and the next task starts empty.
        page.fill("#answer-text", "1. Osaka")
        assert len(page.evaluate(DRAFTS)) == 3
        page.click("#submit-text")
        page.wait_for_selector("#done-count:text-is('1')")
        page.wait_for_selector("#answer-text:enabled")
        assert page.inner_text(".prompt .content") != prompt
        assert page.input_value("#answer-text") == ""
        assert page.evaluate(DRAFTS) == [k for k in keys if k != key]
        # Logging out forgets every draft: the next person on this browser finds none.
        page.fill("#answer-text", "half an answer")
        page.click("text=Log out")
        page.wait_for_url(f"{url}/login")
        assert page.evaluate(DRAFTS) == []
        assert not page.console_errors
    assert [label.value for label in store.labels(ids["demonstration"])] == [{"text": "1. Osaka"}]

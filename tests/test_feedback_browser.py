"""The feedback service in Debian's Chromium: an annotator labels four task types, an admin exports.

The exported pairs then train a reward model (a tiny random model, a few steps).
"""

from __future__ import annotations

import json

import pytest
from feedback_server import running_server

from rlhfkit.config import load_config
from rlhfkit.feedback.store import FeedbackStore
from rlhfkit.models.loading import save_model, tiny_causal_lm
from rlhfkit.models.tokenizer import train_tokenizer
from rlhfkit.train.rm import run_rm

pytestmark = pytest.mark.browser
XSS = "<script>window.__xss = 1; alert('xss')</script><img src=x onerror=\"window.__xss = 2; alert('img')\">"


@pytest.fixture
def seeded_store(tmp_path):
    """A store with an admin, an annotator and one project per task type the test labels."""
    store = FeedbackStore(tmp_path / "feedback.db", seed=0, durable=False)
    store.add_user("root", "admin", "root-password")
    store.add_user("alice", "annotator", "alice-password")
    guidelines = "# Top-5 lists\n\nPrefer **exactly five** distinct items.\n\n<script>alert('g')</script>"
    ids = {
        "ab": store.create_project("ab", "comparison", guidelines),
        "rank": store.create_project("rank", "ranking", guidelines),
        "rate": store.create_project("rate", "likert", guidelines),
        "edit": store.create_project("edit", "edit", guidelines),
    }
    chat = [
        {"role": "system", "content": "You write top-5 lists."},
        {"role": "user", "content": "Top 5 board games for families?"},
    ]
    store.add_items(
        ids["ab"], [{"prompt": chat, "responses": [XSS, "1. Catan 2. Carcassonne 3. Uno 4. Dixit 5. Azul"]}]
    )
    store.add_items(
        ids["rank"],
        [
            {
                "prompt": "Top 5 houseplants",
                "responses": ["1. Pothos 2. Snake plant", "1. Fern", "1. Cactus 2. Aloe 3. Ivy"],
            }
        ],
    )
    store.add_items(
        ids["rate"], [{"prompt": "Top 5 cities", "responses": ["1. Rome 2. Paris 3. Kyoto 4. Lima 5. Oslo"]}]
    )
    store.add_items(ids["edit"], [{"prompt": "Top 5 fruits", "responses": ["1. Apple 2. Apple 3. Pear"]}])
    yield store, ids
    store.close()


@pytest.fixture
def tiny_model(tmp_path):
    """A random-init tiny Llama saved to tmp, the reward model's starting point."""
    texts = ["Top 5 houseplants 1. Pothos 2. Snake plant 3. Fern", "1. Cactus 2. Aloe 3. Ivy"] * 20
    tokenizer = train_tokenizer(texts, vocab_size=200)
    folder = tmp_path / "tiny"
    save_model(
        tiny_causal_lm(tokenizer, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        tokenizer,
        folder,
    )
    return folder


def _login(page, url, name, password, shot=None):
    page.goto(f"{url}/login")
    page.fill("input[name=name]", name)
    page.fill("input[name=password]", password)
    if shot:
        page.screenshot(path=str(shot))
    page.click("button[type=submit]")
    page.wait_for_url(f"{url}/")


def test_annotator_and_admin_in_the_browser(
    browser, page, screenshot_dir, seeded_store, tiny_model, tmp_path
):
    store, ids = seeded_store
    dialogs = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))
    with running_server(store) as url:
        _login(page, url, "alice", "alice-password", screenshot_dir / "login.png")
        page.screenshot(path=str(screenshot_dir / "projects.png"))

        # Guidelines: Markdown rendered, the HTML in it shown as text.
        page.goto(f"{url}/projects/{ids['ab']}/guidelines")
        assert page.inner_text("article.guidelines h1") == "Top-5 lists"
        assert "<script>alert('g')</script>" in page.inner_text("article.guidelines")
        page.screenshot(path=str(screenshot_dir / "guidelines.png"))
        page.click("#start")

        # A/B with a strength and a chat prompt; the response with markup is only text.
        page.wait_for_selector("#choose-right")
        assert page.locator(".conversation .message").count() == 2
        assert XSS in page.inner_text(".pair")
        assert page.evaluate("window.__xss") is None
        page.check("input[name=strength][value='2']")
        page.screenshot(path=str(screenshot_dir / "annotate-comparison.png"))
        shown_right = page.inner_text(".pair .response:nth-child(2) .text")
        page.click("#choose-right")
        page.wait_for_selector("#all-done")

        # Ranking with the keyboard: move the first response down by one.
        page.goto(f"{url}/projects/{ids['rank']}/annotate")
        page.wait_for_selector(".rank-item")
        before = page.locator(".rank-item .text").all_inner_texts()
        page.focus(".rank-item >> nth=0")
        page.keyboard.press("ArrowDown")
        after = page.locator(".rank-item .text").all_inner_texts()
        assert after == [before[1], before[0], before[2]]
        page.screenshot(path=str(screenshot_dir / "annotate-ranking.png"))
        page.click("#submit-ranking")
        page.wait_for_selector("#all-done")

        # Likert 1-7.
        page.goto(f"{url}/projects/{ids['rate']}/annotate")
        page.wait_for_selector("button.rating")
        assert page.locator("button.rating").count() == 7
        page.screenshot(path=str(screenshot_dir / "annotate-likert.png"))
        page.click("button.rating[data-rating='6']")
        page.wait_for_selector("#all-done")

        # Edit.
        page.goto(f"{url}/projects/{ids['edit']}/annotate")
        page.wait_for_selector("#answer-text")
        assert page.input_value("#answer-text") == "1. Apple 2. Apple 3. Pear"
        page.fill("#answer-text", "1. Apple 2. Pear 3. Mango 4. Kiwi 5. Plum")
        page.screenshot(path=str(screenshot_dir / "annotate-edit.png"))
        page.click("#submit-text")
        page.wait_for_selector("#all-done")
        assert not dialogs and page.evaluate("window.__xss") is None
        assert not page.console_errors

        # An annotator is refused the dashboard.
        assert page.goto(f"{url}/admin").status == 403

        # The admin sees the labels and downloads the ranking export.
        admin_context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        admin = admin_context.new_page()
        _login(admin, url, "root", "root-password")
        admin.goto(f"{url}/admin")
        for key in ids:
            assert admin.inner_text(f"#project-{ids[key]} .n-labels") == "1 labels"
        assert "alice" in admin.inner_text(f"#project-{ids['rank']} table")
        admin.screenshot(path=str(screenshot_dir / "dashboard.png"), full_page=True)
        with admin.expect_download() as download_info:
            admin.click(f"#project-{ids['rank']} a[href$='format=trl-preference']")
        export_path = tmp_path / "rank-pairs.jsonl"
        download_info.value.save_as(export_path)
        # The exclude button (a CSRF-protected form) works under the page's CSP, and undoes.
        with admin.expect_navigation():
            admin.click(f"#project-{ids['rate']} .exclude-button")
        assert admin.url.endswith(f"/admin#project-{ids['rate']}")
        assert store.excluded_annotators() == ["alice"]
        assert admin.inner_text(f"#project-{ids['rate']} .exclude-button") == "Include again"
        with admin.expect_navigation():
            admin.click(f"#project-{ids['rate']} .exclude-button")
        assert store.excluded_annotators() == []
        admin.goto(f"{url}/admin/projects/new")
        admin.screenshot(path=str(screenshot_dir / "project-new.png"))
        admin_context.close()

    # What the browser did is what the store holds.
    (ab_label,) = store.labels(ids["ab"])
    assert ab_label.strength == 2
    assert store.items(ids["ab"])[0].responses[ab_label.chosen] == shown_right
    rank_item = store.items(ids["rank"])[0]
    (rank_label,) = store.labels(ids["rank"])
    assert [rank_item.responses[i] for i in rank_label.value["ranking"]] == after
    assert store.labels(ids["rate"])[0].value == {"rating": 6}
    assert store.labels(ids["edit"])[0].value == {"text": "1. Apple 2. Pear 3. Mango 4. Kiwi 5. Plum"}

    # The downloaded export is 3 TRL pairs (C(3,2)) that train the reward model.
    pairs = [json.loads(line) for line in export_path.read_text().splitlines()]
    assert len(pairs) == 3 and pairs[0]["chosen"] == after[0]
    config = load_config(None, ["rm.val_share=0", "rm.batch_size=3", "rm.epochs=2"], "default")
    result = run_rm(config, tiny_model, pairs, tmp_path / "rm", show_progress=False)
    assert result["n_train_pairs"] == 3 and (tmp_path / "rm" / "model" / "config.json").is_file()

"""Server-rendered pages of the feedback service (Jinja2, autoescaped)."""

from __future__ import annotations

import hmac
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markdown_it import MarkdownIt
from markupsafe import Markup

from rlhfkit.feedback.api import JsonText
from rlhfkit.feedback.auth import new_token
from rlhfkit.feedback.exports import FORMATS_BY_TASK_TYPE
from rlhfkit.feedback.session import (
    COOKIE,
    CSRF_HEADER,
    Caller,
    TooManyLogins,
    check_csrf,
    cookies_secure,
    csrf_matches,
    current_caller,
    log_in,
    set_session_cookie,
    sign_up,
    start_session,
)
from rlhfkit.feedback.store import TASK_TYPES, FeedbackStore

HERE = Path(__file__).parent
STATIC = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")  # autoescapes .html templates
router = APIRouter(include_in_schema=False)
# Guidelines are Markdown written by admins; raw HTML in them is shown as text, and
# markdown-it refuses javascript: and data: links.
_markdown = MarkdownIt("commonmark", {"html": False})
# Login and sign-up forms have no session yet: a double-submit cookie protects them.
LOGIN_CSRF_COOKIE = "rlhfkit_form_csrf"
TASK_LABELS = {
    "comparison": "A/B comparison",
    "ranking": "ranking",
    "likert": "Likert rating (1-7)",
    "binary": "thumbs up/down",
    "edit": "edit a response",
    "demonstration": "write a demonstration",
}


def render_markdown(text: str) -> Markup:
    """Guidelines as safe HTML (any HTML in the source is escaped)."""
    return Markup(_markdown.render(text))


def _store(request: Request) -> FeedbackStore:
    return request.app.state.store


def _page(
    request: Request, name: str, caller: Caller | None, status: int = 200, **context: Any
) -> HTMLResponse:
    context.update(
        caller=caller,
        csrf=caller.csrf if caller else "",
        task_labels=TASK_LABELS,
        formats=FORMATS_BY_TASK_TYPE,
    )
    return templates.TemplateResponse(request, name, context, status_code=status)


def _form_page(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
    """A page with a pre-session form: sets the double-submit CSRF cookie."""
    token = new_token()
    response = templates.TemplateResponse(
        request, name, {**context, "caller": None, "csrf": token}, status_code=status
    )
    # Secure like the session cookie: sent over plain http, the token would let a listener forge a login.
    response.set_cookie(
        LOGIN_CSRF_COOKIE, token, httponly=True, samesite="strict", path="/", secure=cookies_secure(request)
    )
    return response


def _form_csrf_ok(request: Request, sent: str) -> bool:
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    return bool(expected) and hmac.compare_digest(sent.encode(), expected.encode())


def _login_redirect() -> RedirectResponse:
    return RedirectResponse("/login", status_code=303)


def _forbidden(request: Request, caller: Caller) -> HTMLResponse:
    return _page(request, "error.html", caller, status=403, message="This page is for admins only.")


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request) -> Response:
    """The login form."""
    return _form_page(request, "login.html")


@router.post("/login")
def login_form(
    request: Request,
    name: Annotated[str, Form(max_length=200), JsonText],
    password: Annotated[str, Form(max_length=1024)],
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """Check the form; on success set the session cookie and go to the projects."""
    if not _form_csrf_ok(request, csrf_token):
        return _form_page(request, "login.html", status=403, error="The form expired; please try again.")
    try:
        user = log_in(request, name, password)
    except TooManyLogins as exc:
        message = f"Too many failed logins; try again in {exc.retry_after} seconds."
        return _form_page(request, "login.html", status=429, error=message)
    if user is None:
        return _form_page(request, "login.html", status=401, error="Wrong user name or password.")
    token, _ = start_session(request, user.user_id)
    response = RedirectResponse("/", status_code=303)
    set_session_cookie(request, response, token)
    response.delete_cookie(LOGIN_CSRF_COOKIE, path="/")
    return response


@router.get("/signup", response_class=HTMLResponse, name="signup_page")
def signup_page(request: Request, invite: str = "") -> Response:
    """Sign up from an invite link."""
    role = _store(request).invite_role(invite) if invite else None
    if role is None:
        return _page(
            request, "error.html", None, status=403, message="This invite link is unknown, used or expired."
        )
    return _form_page(request, "signup.html", invite=invite, role=role)


@router.post("/signup")
def signup_form(
    request: Request,
    invite: Annotated[str, Form(max_length=200)],
    name: Annotated[str, Form(max_length=200)],
    password: Annotated[str, Form(max_length=1024)],
    csrf_token: Annotated[str, Form(max_length=200)] = "",
) -> Response:
    """Create the account and log in."""
    store = _store(request)
    role = store.invite_role(invite)
    if not _form_csrf_ok(request, csrf_token) or role is None:
        return _page(request, "error.html", None, status=403, message="The form or invite expired.")
    try:
        user_id = sign_up(request, invite, name.strip(), password)
    except TooManyLogins as exc:
        message = f"Too many sign-ups from this address; try again in {exc.retry_after} seconds."
        return _form_page(request, "signup.html", status=429, invite=invite, role=role, error=message)
    except (ValueError, PermissionError) as exc:
        return _form_page(request, "signup.html", status=400, invite=invite, role=role, error=str(exc))
    token, _ = start_session(request, user_id)
    response = RedirectResponse("/", status_code=303)
    set_session_cookie(request, response, token)
    return response


@router.post("/logout")
def logout_form(request: Request, csrf_token: Annotated[str, Form(max_length=200)] = "") -> Response:
    """Log out and go to the login page."""
    caller = current_caller(request)
    if caller is None:
        # Logged out already (in another tab, or the session expired): nothing to end. The cookie is
        # left alone: a cross-site POST arrives without it (SameSite=Lax), and deleting it then would
        # let any site log the user out.
        return _login_redirect()
    if not csrf_matches(caller, request.headers.get(CSRF_HEADER, csrf_token)):
        # Most likely a page from before the user logged in again elsewhere (which rotated the token;
        # the page's script fetches the new one, so this is a page without JavaScript). The answer's
        # own header carries the current token, so its Log out button works.
        message = "This page was out of date, so you are still logged in. Log out with the button above."
        return _page(request, "error.html", caller, status=403, message=message)
    _store(request).end_session(request.cookies.get(COOKIE, ""))
    response = _login_redirect()
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/", response_class=HTMLResponse)
def home(request: Request) -> Response:
    """The projects the user can work on."""
    caller = current_caller(request)
    if caller is None:
        return _login_redirect()
    return _page(request, "home.html", caller, projects=_store(request).projects())


def _project_or_404(request: Request, caller: Caller, project_id: int) -> Any:
    try:
        return _store(request).project(project_id)
    except KeyError:
        return _page(request, "error.html", caller, status=404, message=f"No project with id {project_id}.")


@router.get("/projects/{project_id}/guidelines", response_class=HTMLResponse)
def guidelines(request: Request, project_id: int) -> Response:
    """A project's guidelines, rendered from Markdown."""
    caller = current_caller(request)
    if caller is None:
        return _login_redirect()
    project = _project_or_404(request, caller, project_id)
    if isinstance(project, Response):
        return project
    html = render_markdown(project.guidelines or "_No guidelines yet._")
    return _page(request, "guidelines.html", caller, project=project, guidelines_html=html)


@router.get("/projects/{project_id}/annotate", response_class=HTMLResponse)
def annotate(request: Request, project_id: int) -> Response:
    """The annotation page; its script fetches tasks from the JSON API."""
    caller = current_caller(request)
    if caller is None:
        return _login_redirect()
    project = _project_or_404(request, caller, project_id)
    if isinstance(project, Response):
        return project
    # The caller's own labels only (golden ones included, unmarked): nobody else's work shows.
    n_done = len(_store(request).labels(project_id, annotator_id=caller.user.annotator_id))
    return _page(request, "annotate.html", caller, project=project, n_done=n_done)


@router.get("/admin", response_class=HTMLResponse)
def dashboard(request: Request) -> Response:
    """The admin dashboard: every project's progress, annotators, agreement and exports."""
    caller = current_caller(request)
    if caller is None:
        return _login_redirect()
    if caller.user.role != "admin":
        return _forbidden(request, caller)
    store = _store(request)
    rows = []
    for project in store.projects():
        alpha = store.agreement(project.project_id)
        rows.append(
            {
                "project": project,
                "progress": store.progress(project.project_id),
                "annotators": store.annotator_stats(project.project_id),
                "alpha": None if alpha is None else round(alpha, 3),
            }
        )
    return _page(request, "admin.html", caller, rows=rows, users=store.users())


@router.get("/admin/projects/new", response_class=HTMLResponse)
def new_project_page(request: Request) -> Response:
    """The form to create a project."""
    caller = current_caller(request)
    if caller is None:
        return _login_redirect()
    if caller.user.role != "admin":
        return _forbidden(request, caller)
    values = {"name": "", "task_type": TASK_TYPES[0], "guidelines": "", "overlap": 1, "golden_rate": 0}
    return _page(request, "project_new.html", caller, task_types=TASK_TYPES, values=values)


@router.post("/admin/projects", dependencies=[Depends(check_csrf)])
def new_project_form(
    request: Request,
    name: Annotated[str, Form(min_length=1, max_length=200), JsonText],
    task_type: Annotated[str, Form()],
    guidelines: Annotated[str, Form(max_length=100_000), JsonText] = "",
    overlap: Annotated[int, Form(ge=1, le=100)] = 1,
    golden_rate: Annotated[float, Form(ge=0, le=1)] = 0.0,
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Create the project and go to the dashboard."""
    caller = current_caller(request)
    assert caller is not None  # check_csrf made sure
    if caller.user.role != "admin":
        return _forbidden(request, caller)
    store = _store(request)
    error = None
    existing = store.project_named_like(name.strip())
    if existing == name.strip():
        error = f"A project named {existing!r} exists."
    elif existing is not None:
        error = (
            f"A project named {existing!r} exists, and {name.strip()!r} differs from it only in case, "
            "spacing or Unicode form."
        )
    else:
        try:
            store.create_project(name.strip(), task_type, guidelines, overlap, golden_rate)
        except ValueError as exc:
            error = str(exc)
    if error:
        # The form comes back filled in: the guidelines may be pages of Markdown.
        values = {
            "name": name,
            "task_type": task_type,
            "guidelines": guidelines,
            "overlap": overlap,
            "golden_rate": golden_rate,
        }
        return _page(
            request, "project_new.html", caller, status=400, task_types=TASK_TYPES, error=error, values=values
        )
    return RedirectResponse("/admin", status_code=303)


@router.post("/admin/invites", response_class=HTMLResponse, dependencies=[Depends(check_csrf)])
def invite_form(
    request: Request, role: Annotated[str, Form()] = "annotator", csrf_token: Annotated[str, Form()] = ""
) -> Response:
    """Create an invite link and show it."""
    caller = current_caller(request)
    assert caller is not None
    if caller.user.role != "admin":
        return _forbidden(request, caller)
    try:
        token = _store(request).create_invite(role, caller.user.user_id)
    except ValueError as exc:
        return _page(request, "error.html", caller, status=400, message=str(exc))
    url = str(request.url_for("signup_page")) + f"?invite={token}"
    return _page(request, "invite.html", caller, url=url, role=role)


@router.post("/admin/annotators/{name:path}/exclude", dependencies=[Depends(check_csrf)])
def exclude_form(
    request: Request,
    name: Annotated[str, JsonText],
    excluded: Annotated[bool, Form()] = True,
    project_id: Annotated[int | None, Form()] = None,
    csrf_token: Annotated[str, Form()] = "",
) -> Response:
    """Leave an annotator's labels out of exports (or take them back in); back to the dashboard."""
    caller = current_caller(request)
    assert caller is not None  # check_csrf made sure
    if caller.user.role != "admin":
        return _forbidden(request, caller)
    try:
        _store(request).exclude_annotator(name, excluded)
    except KeyError:
        return _page(request, "error.html", caller, status=404, message=f"No annotator named {name!r}.")
    anchor = f"#project-{project_id}" if project_id is not None else ""
    return RedirectResponse(f"/admin{anchor}", status_code=303)

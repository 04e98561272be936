"""The JSON API of the feedback service: typed request and response models, one route per action.

Every state-changing call needs the session's CSRF token in the X-CSRF-Token header
(login and sign-up excepted: they have no session yet). Annotators see their own
tasks and labels only; everything else is for admins.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from starlette.background import BackgroundTask

from rlhfkit.feedback.session import (
    COOKIE,
    Caller,
    TooManyLogins,
    check_csrf,
    log_in,
    require_admin,
    require_user,
    set_session_cookie,
    sign_up,
    start_session,
)
from rlhfkit.feedback.store import TASK_TYPES, FeedbackStore, unstorable

router = APIRouter(prefix="/api")
TaskType = Literal["comparison", "ranking", "likert", "binary", "edit", "demonstration"]
assert set(TaskType.__args__) == set(TASK_TYPES)  # type: ignore[attr-defined]
ExportFormat = Literal["trl-preference", "trl-unpaired", "sft", "raw"]
Name = Annotated[str, Field(min_length=1, max_length=200)]


def json_text(value: Any) -> Any:
    """`value` itself; ValueError saying what keeps it from being stored (see `store.unstorable`)."""
    if (problem := unstorable(value)) is not None:
        raise ValueError(problem)
    return value


# Form fields and path parameters that reach the database get the check that JSON bodies get.
JsonText = AfterValidator(json_text)


class _Model(BaseModel):
    # Typed numbers refuse NaN and infinity with pydantic's own message; the check below covers
    # what typing does not (free-form meta, answers, golden keys) and text.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _json_text_only(cls, value: Any) -> Any:
        return json_text(value)


class LoginRequest(_Model):
    name: Name
    password: Annotated[str, Field(min_length=1, max_length=1024)]


class SignupRequest(_Model):
    invite: Annotated[str, Field(min_length=1, max_length=200)]
    name: Name
    password: Annotated[str, Field(min_length=8, max_length=1024)]


class Me(BaseModel):
    name: str
    role: str
    csrf_token: str


class ProjectIn(_Model):
    name: Name
    task_type: TaskType = "comparison"
    guidelines: Annotated[str, Field(max_length=100_000)] = ""
    overlap: Annotated[int, Field(ge=1, le=100)] = 1
    golden_rate: Annotated[float, Field(ge=0, le=1)] = 0.0


class ProjectOut(BaseModel):
    id: int
    name: str
    task_type: str
    guidelines: str
    overlap: int
    golden_rate: float | None = None  # admins only


class ChatMessage(_Model):
    role: Literal["system", "user", "assistant"]
    content: Annotated[str, Field(min_length=1)]


class ItemIn(_Model):
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[ChatMessage], Field(min_length=1)]
    responses: list[str] = []
    overlap: Annotated[int, Field(ge=1, le=100)] | None = None
    meta: dict[str, Any] = {}
    golden: dict[str, Any] | None = None


class ItemsIn(_Model):
    items: Annotated[list[ItemIn], Field(min_length=1, max_length=10_000)]


class ItemsOut(BaseModel):
    item_ids: list[int]


class TaskOut(BaseModel):
    """A leased task; `responses` are in the presented order. Nothing marks golden items."""

    token: str
    task_type: str
    prompt: str
    messages: list[dict[str, str]] | None
    responses: list[str]


class NextOut(BaseModel):
    task: TaskOut | None


class SubmitIn(_Model):
    token: Annotated[str, Field(min_length=1, max_length=64)]
    answer: dict[str, Any]


class SubmitOut(BaseModel):
    label_id: int


class UnprocessableOut(BaseModel):
    """A 422: a malformed body (`detail` is pydantic's list of errors, each with its `loc`), or an
    answer or task token that does not fit the task (`detail` is the message, `field` names the field).
    """

    detail: str | list[dict[str, Any]]
    field: str | None = None


class LabelOut(BaseModel):
    label_id: int
    annotator: str
    kind: str
    chosen: int | None
    strength: int | None
    value: dict[str, Any] | None
    seconds: float | None
    created_at: str


class AnnotatorStats(BaseModel):
    annotator: str
    n_labels: int
    mean_seconds: float | None
    median_seconds: float | None
    n_golden: int
    golden_accuracy: float | None
    excluded: bool


class StatsOut(BaseModel):
    project: ProjectOut
    n_items: int
    n_items_complete: int
    n_labels: int
    n_annotators: int
    agreement_alpha: float | None
    annotators: list[AnnotatorStats]


class InviteIn(_Model):
    role: Literal["admin", "annotator"] = "annotator"


class InviteOut(BaseModel):
    url: str


class ExcludeIn(_Model):
    excluded: bool = True


def get_store(request: Request) -> FeedbackStore:
    """The app's store."""
    return request.app.state.store


StoreDep = Annotated[FeedbackStore, Depends(get_store)]
UserDep = Annotated[Caller, Depends(require_user)]
AdminDep = Annotated[Caller, Depends(require_admin)]


def _project_out(store: FeedbackStore, project_id: int, admin: bool) -> ProjectOut:
    try:
        p = store.project(project_id)
    except KeyError:
        raise HTTPException(404, f"no project with id {project_id}") from None
    return ProjectOut(
        id=p.project_id,
        name=p.name,
        task_type=p.task_type,
        guidelines=p.guidelines,
        overlap=p.overlap,
        golden_rate=p.golden_rate if admin else None,
    )


@router.post("/login", response_model=Me)
def login(body: LoginRequest, request: Request, response: Response, store: StoreDep) -> Me:
    """Log in; sets the session cookie and returns the CSRF token for later calls."""
    try:
        user = log_in(request, body.name, body.password)
    except TooManyLogins as exc:
        raise HTTPException(429, str(exc), {"Retry-After": str(exc.retry_after)}) from None
    if user is None:
        raise HTTPException(401, "wrong user name or password")
    token, csrf = start_session(request, user.user_id)
    set_session_cookie(request, response, token)
    return Me(name=user.name, role=user.role, csrf_token=csrf)


@router.post("/signup", response_model=Me)
def signup(body: SignupRequest, request: Request, response: Response, store: StoreDep) -> Me:
    """Create an account from an invite link's token; logs the new user in."""
    try:
        user_id = sign_up(request, body.invite, body.name, body.password)
    except TooManyLogins as exc:
        raise HTTPException(429, str(exc), {"Retry-After": str(exc.retry_after)}) from None
    except PermissionError as exc:
        raise HTTPException(403, str(exc)) from None
    user = next(u for u in store.users() if u.user_id == user_id)
    token, csrf = start_session(request, user_id)
    set_session_cookie(request, response, token)
    return Me(name=user.name, role=user.role, csrf_token=csrf)


@router.post("/logout", status_code=204, dependencies=[Depends(check_csrf)])
def logout(request: Request, store: StoreDep) -> Response:
    """End the session."""
    store.end_session(request.cookies.get(COOKIE, ""))
    response = Response(status_code=204)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/me", response_model=Me)
def me(caller: UserDep) -> Me:
    """Who is logged in, and the CSRF token to send with state-changing calls."""
    return Me(name=caller.user.name, role=caller.user.role, csrf_token=caller.csrf)


@router.get("/projects", response_model=list[ProjectOut])
def list_projects(caller: UserDep, store: StoreDep) -> list[ProjectOut]:
    """Every project (admins also see the golden rate)."""
    admin = caller.user.role == "admin"
    return [_project_out(store, p.project_id, admin) for p in store.projects()]


@router.post("/projects", response_model=ProjectOut, status_code=201, dependencies=[Depends(check_csrf)])
def create_project(body: ProjectIn, caller: AdminDep, store: StoreDep) -> ProjectOut:
    """Create a project (admin); 409 when a project has that name, or one that reads the same."""
    existing = store.project_named_like(body.name)
    if existing == body.name:
        raise HTTPException(409, f"field 'name': a project named {body.name!r} exists")
    if existing is not None:
        raise HTTPException(
            409,
            f"field 'name': a project named {existing!r} exists, and {body.name!r} differs from it "
            "only in case, spacing or Unicode form",
        )
    project_id = store.create_project(
        body.name, body.task_type, body.guidelines, body.overlap, body.golden_rate
    )
    return _project_out(store, project_id, True)


@router.get("/projects/{project_id}", response_model=ProjectOut)
def get_project(project_id: int, caller: UserDep, store: StoreDep) -> ProjectOut:
    """One project with its guidelines."""
    return _project_out(store, project_id, caller.user.role == "admin")


@router.post(
    "/projects/{project_id}/items",
    response_model=ItemsOut,
    status_code=201,
    dependencies=[Depends(check_csrf)],
)
def add_items(project_id: int, body: ItemsIn, caller: AdminDep, store: StoreDep) -> ItemsOut:
    """Import items (admin); nothing is stored if any item is invalid."""
    _project_out(store, project_id, True)
    items = [item.model_dump(exclude_none=True, exclude_unset=True) for item in body.items]
    for item, raw in zip(items, body.items, strict=True):
        if isinstance(raw.prompt, list):
            item["prompt"] = [m.model_dump() for m in raw.prompt]
    return ItemsOut(item_ids=store.add_items(project_id, items))


@router.post("/projects/{project_id}/next", response_model=NextOut, dependencies=[Depends(check_csrf)])
def next_task(project_id: int, request: Request, caller: UserDep, store: StoreDep) -> NextOut:
    """Lease the caller's next task in the project (the same one again while it is held)."""
    _project_out(store, project_id, False)
    task = store.next_task(project_id, caller.user.annotator_id, request.app.state.lease_seconds)
    if task is None:
        return NextOut(task=None)
    return NextOut(
        task=TaskOut(
            token=task.token,
            task_type=task.task_type,
            prompt=task.prompt,
            messages=task.messages,
            responses=task.responses,
        )
    )


@router.post(
    "/submit",
    response_model=SubmitOut,
    dependencies=[Depends(check_csrf)],
    # The spec says both shapes of a 422, so that clients (and the fuzz test) can rely on it.
    responses={422: {"model": UnprocessableOut}},
)
def submit(body: SubmitIn, caller: UserDep, store: StoreDep) -> SubmitOut:
    """Answer a leased task; a retry with the same token and answer returns the same label."""
    return SubmitOut(label_id=store.submit(body.token, caller.user.annotator_id, body.answer))


def _label_out(label: Any) -> LabelOut:
    return LabelOut(
        label_id=label.label_id,
        annotator=label.annotator,
        kind=label.kind,
        chosen=label.chosen,
        strength=label.strength,
        value=label.value,
        seconds=label.seconds,
        created_at=label.created_at.isoformat(),
    )


@router.get("/projects/{project_id}/my-labels", response_model=list[LabelOut])
def my_labels(project_id: int, caller: UserDep, store: StoreDep) -> list[LabelOut]:
    """The caller's own labels in the project (never anyone else's, never golden keys)."""
    _project_out(store, project_id, False)
    return [_label_out(label) for label in store.labels(project_id, annotator_id=caller.user.annotator_id)]


@router.get("/projects/{project_id}/labels", response_model=list[LabelOut])
def all_labels(project_id: int, caller: AdminDep, store: StoreDep) -> list[LabelOut]:
    """Every label of the project (admin)."""
    _project_out(store, project_id, True)
    return [_label_out(label) for label in store.labels(project_id)]


@router.get("/projects/{project_id}/stats", response_model=StatsOut)
def stats(project_id: int, caller: AdminDep, store: StoreDep) -> StatsOut:
    """Dashboard figures (admin): progress, per-annotator counts, time, golden accuracy, agreement."""
    project = _project_out(store, project_id, True)
    progress = store.progress(project_id)
    alpha = store.agreement(project_id)
    return StatsOut(
        project=project,
        agreement_alpha=None if alpha is None else round(alpha, 4),
        annotators=[AnnotatorStats(**row) for row in store.annotator_stats(project_id)],
        **progress,
    )


@router.get("/projects/{project_id}/export")
def export(
    project_id: int,
    caller: AdminDep,
    store: StoreDep,
    format: Annotated[ExportFormat, Query()] = "trl-preference",
) -> FileResponse:
    """Download an export as JSONL (admin)."""
    project = _project_out(store, project_id, True)
    folder = Path(tempfile.mkdtemp(prefix="rlhfkit-export-"))
    # A fixed file name on disk: the project's name is free text ("../x", "films/2024") and only
    # names the download.
    path = folder / "export.jsonl"
    try:
        store.export(project_id, path, format)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    download = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{project.name}-{format}.jsonl")
    return FileResponse(
        path,
        media_type="application/x-ndjson",
        filename=download,
        background=BackgroundTask(shutil.rmtree, folder, ignore_errors=True),
    )


@router.post("/invites", response_model=InviteOut, status_code=201, dependencies=[Depends(check_csrf)])
def create_invite(body: InviteIn, request: Request, caller: AdminDep, store: StoreDep) -> InviteOut:
    """A one-time sign-up link (admin)."""
    token = store.create_invite(body.role, caller.user.user_id)
    return InviteOut(url=str(request.url_for("signup_page")) + f"?invite={token}")


@router.post("/annotators/{name:path}/exclude", status_code=204, dependencies=[Depends(check_csrf)])
def exclude(name: Annotated[str, JsonText], body: ExcludeIn, caller: AdminDep, store: StoreDep) -> Response:
    """Leave an annotator's labels out of exports, or take them back in (admin)."""
    try:
        store.exclude_annotator(name, body.excluded)
    except KeyError as exc:
        raise HTTPException(404, str(exc.args[0])) from None
    return Response(status_code=204)

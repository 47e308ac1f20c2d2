"""The job-status dashboard: server-rendered pages signed in with an API key, plus the small JSON polls they refresh from.

Pages read through the same services as `/v1` and see exactly what the session's API key sees.
"""

import hashlib
import re
import time
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, FastAPI, Form, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup, escape

from api.dashboard import forms, session as cookies, views
from api.dashboard.auth import signed_in_caller
from api.deps import SessionDep, SettingsDep, StorageDep
from api.services import artifacts, files as files_service, jobs as jobs_service, models as models_service
from api.services.projects import authenticate, end_dashboard_session, start_dashboard_session
from core.errors import AuthenticationError, Conflict, InvalidRequest, LorajobsError, PayloadTooLarge, QuotaExceeded
from core.settings import Settings
from db import lifecycle
from db.models import Job, Project
from db.repositories import workers as workers_repo

API_ROOT = Path(__file__).resolve().parent.parent
TEMPLATES = Environment(loader=FileSystemLoader(API_ROOT / "templates"), autoescape=select_autoescape(default=True),
                        trim_blocks=True, lstrip_blocks=True)
STATIC_DIR = API_ROOT / "static"
POLL_PREFIX = "/dashboard/api"
JOBS_PER_PAGE = 20
FILES_PER_PAGE = 100
EVENTS_SHOWN = 200
EVENTS_PER_POLL = 500  # a tab that was away catches up in a few polls
POLL_BUSY_MS = 1500
POLL_IDLE_MS = 10_000  # the jobs page with nothing in flight
EVENT_PAGES_FOR_CHART = 10  # 10,000 events: the chart of a very long job shows its latest steps
SECURITY_HEADERS = {
    # Everything comes from this app: the dashboard works on an isolated network and runs no injected script.
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "same-origin",
    "cache-control": "no-store",
}


def _asset_version() -> str:
    digest = hashlib.sha256()
    for path in sorted(STATIC_DIR.glob("*")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:10]


def inline_code(text: str) -> Markup:
    """The spec's descriptions mark names with backticks: show them as code, escaping everything else."""
    return Markup(re.sub(r"`([^`]+)`", r"<code>\1</code>", str(escape(text))))


TEMPLATES.globals["asset_version"] = _asset_version()
TEMPLATES.filters["inline_code"] = inline_code


class SignInRequired(Exception):
    def __init__(self, reason: str | None = None):
        super().__init__(reason)
        self.reason = reason


class FormExpired(Exception):
    """A POST without the CSRF token of the session that sent it."""


def _error_page(request: Request, status: int, title: str, message: str) -> Response:
    if request.url.path.startswith(POLL_PREFIX):
        return JSONResponse({"error": {"message": message}}, status_code=status)
    return render(request, "error.html", status_code=status, title=title, message=message)


class DashboardRoute(APIRoute):
    """Errors become pages (a redirect to sign in, a 404 page) instead of the API's JSON envelope."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def dashboard_handler(request: Request) -> Response:
            try:
                response = await handler(request)
            except SignInRequired as exc:
                response = _sign_in_again(request, exc.reason)
            except FormExpired:
                response = _error_page(request, 403, "Form expired",
                                       "This form was sent without a valid session token. Reload the page and try again.")
            except LorajobsError as exc:
                title = "Not found" if exc.status_code == 404 else "Something went wrong"
                response = _error_page(request, exc.status_code, title, exc.message)
            response.headers.update(SECURITY_HEADERS)
            return response

        return dashboard_handler


router = APIRouter(route_class=DashboardRoute, include_in_schema=False)


def install(app: FastAPI) -> None:
    """Serve the dashboard and its static files from the API app."""
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


# --- session and rendering ------------------------------------------------------------------------------------


def session_of(request: Request, settings: SettingsDep) -> cookies.DashboardSession | None:
    return cookies.decode(request.cookies.get(cookies.COOKIE_NAME), settings.secret_key)


CookieSession = Annotated[cookies.DashboardSession | None, Depends(session_of)]


def signed_in_project(request: Request, db: SessionDep, session: CookieSession) -> Project:
    """The project of the session's API key; the session and the key are checked again on every request."""
    if session is None or not session.signed_in:
        raise SignInRequired()
    caller = signed_in_caller(db, session)
    if caller is None:
        raise SignInRequired("revoked")
    request.state.session = session
    return caller.project


DashboardProject = Annotated[Project, Depends(signed_in_project)]


def check_csrf(settings: SettingsDep, session: CookieSession, csrf_token: Annotated[str, Form()] = "") -> None:
    if not cookies.csrf_valid(session, settings.secret_key, csrf_token):
        raise FormExpired()


CsrfChecked = Depends(check_csrf)


def set_session_cookie(request: Request, response: Response, session: cookies.DashboardSession) -> None:
    settings: Settings = request.app.state.settings
    # The scheme is the client's behind a proxy uvicorn trusts (LORAJOBS_FORWARDED_ALLOW_IPS).
    secure = settings.secure_cookies if settings.secure_cookies is not None else request.url.scheme == "https"
    response.set_cookie(cookies.COOKIE_NAME, cookies.encode(session, settings.secret_key),
                        max_age=cookies.MAX_AGE_SECONDS, httponly=True, samesite="lax", path="/", secure=secure)


def render(request: Request, template: str, *, status_code: int = 200, **context: Any) -> HTMLResponse:
    session = getattr(request.state, "session", None)
    csrf = cookies.csrf_token(session, request.app.state.settings.secret_key) if session else ""
    html = TEMPLATES.get_template(template).render(request_path=request.url.path, csrf=csrf, **context)
    return HTMLResponse(html, status_code=status_code)


def fragment(request: Request, template: str, **context: Any) -> str:
    """A part of a page, rendered as on the page, for a poll to swap in."""
    return render(request, template, **context).body.decode()


def _safe_next(target: str | None) -> str:
    """Only a path on this site: never an open redirect to another host."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/jobs"


def _sign_in_again(request: Request, reason: str | None) -> Response:
    if request.url.path.startswith(POLL_PREFIX):
        return JSONResponse({"error": {"message": "Signed out", "login": "/login"}}, status_code=401)
    query = {"next": request.url.path + (f"?{request.url.query}" if request.url.query else "")}
    if reason:
        query["reason"] = reason
    response = RedirectResponse("/login?" + urlencode(query), status_code=303)
    if reason:
        set_session_cookie(request, response, cookies.new_session())
    return response


def _see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


# --- sign-in ---------------------------------------------------------------------------------------------------


@router.get("/")
def home(db: SessionDep, session: CookieSession) -> RedirectResponse:
    signed_in = signed_in_caller(db, session) is not None
    return _see_other("/jobs" if signed_in else "/login")


def _login_page(request: Request, session: cookies.DashboardSession, *, next_url: str, error: str | None = None,
                notice: str | None = None, status: int = 200) -> HTMLResponse:
    request.state.session = session
    response = render(request, "login.html", status_code=status, next_url=next_url, error=error, notice=notice)
    set_session_cookie(request, response, session)
    return response


@router.get("/login")
def login_form(request: Request, db: SessionDep, session: CookieSession, next: str | None = None,
               reason: str | None = None) -> Response:
    if signed_in_caller(db, session) is not None:
        return _see_other(_safe_next(next))
    notice = "Your API key is no longer active; sign in with an active key." if reason == "revoked" else None
    fresh = session if session is not None and not session.signed_in else cookies.new_session()
    return _login_page(request, fresh, next_url=_safe_next(next), notice=notice)


@router.post("/login", dependencies=[CsrfChecked])
def login(request: Request, db: SessionDep, settings: SettingsDep, session: CookieSession,
          api_key: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/jobs") -> Response:
    key = api_key.strip()
    try:
        caller = authenticate(db, key, settings)
    except AuthenticationError:
        error = "Enter your API key." if not key else "That API key is not valid or has been revoked."
        return _login_page(request, session, next_url=_safe_next(next), error=error, status=401)
    response = _see_other(_safe_next(next))
    set_session_cookie(request, response, cookies.new_session(start_dashboard_session(db, caller).id))
    return response


@router.post("/logout", dependencies=[CsrfChecked])
def logout(request: Request, db: SessionDep, session: CookieSession) -> Response:
    if session is not None and session.signed_in:
        end_dashboard_session(db, session.session_id)  # a copy of the cookie is signed out too
    response = _see_other("/login")
    set_session_cookie(request, response, cookies.new_session())
    return response


# --- jobs ------------------------------------------------------------------------------------------------------


def _status_filter(status: str | None) -> str | None:
    return status if status in views.JOB_STATUSES else None


def _jobs_context(db, project: Project, status: str | None, after: str | None) -> dict[str, Any]:
    page = jobs_service.page(db, project, after=after or None, limit=JOBS_PER_PAGE, status=status)
    now = time.time()
    rows = [views.job_row(job, now) for job in page.items]
    next_query = None
    if page.has_more and rows:
        next_query = urlencode({k: v for k, v in (("status", status), ("after", rows[-1].id)) if v})
    return {"rows": rows, "status": status, "after": after, "next_query": next_query,
            "statuses": [(s, views.STATUS_LABELS[s]) for s in views.JOB_STATUSES]}


@router.get("/jobs")
def jobs_page(request: Request, db: SessionDep, project: DashboardProject, status: str | None = None,
              after: str | None = None) -> HTMLResponse:
    context = _jobs_context(db, project, _status_filter(status), after)
    poll = f"{POLL_PREFIX}/jobs?" + urlencode({k: v for k, v in (("status", context["status"]), ("after", after)) if v})
    return render(request, "jobs.html", project=project, poll_url=poll, **context)


@router.get(f"{POLL_PREFIX}/jobs")
def jobs_poll(request: Request, db: SessionDep, project: DashboardProject, status: str | None = None,
              after: str | None = None, v: str | None = None) -> dict:
    """The rows only when they changed since version `v`; a page with nothing in flight is polled less often."""
    context = _jobs_context(db, project, _status_filter(status), after)
    version = views.version_of([views.row_summary(row) for row in context["rows"]])
    busy = any(not row.finished for row in context["rows"])
    update: dict[str, Any] = {"version": version, "interval": POLL_BUSY_MS if busy else POLL_IDLE_MS, "done": False}
    if version != v:
        update["fragments"] = {"job-rows": fragment(request, "_job_rows.html", **context)}
    return update


def _events(db, project: Project, job_id: str) -> tuple[list, list]:
    """The newest events for the log, and every metrics event the chart can use."""
    events, after = [], None
    for _ in range(EVENT_PAGES_FOR_CHART):
        page = jobs_service.events(db, project, job_id, after=after, limit=1000)
        events += page.items
        if not page.has_more or not page.items:
            break
        after = page.items[-1].id
    shown = [views.event_row(event) for event in events[:EVENTS_SHOWN]]
    return shown, [event for event in events if event.type == "metrics"]


def _unserved(db, job: Job) -> str | None:
    """For a queued job: a warning when no live worker consumes its queue (worker heartbeats)."""
    if job.status != "queued":
        return None
    placement = job.placement or {}
    return workers_repo.unserved_message(db, lifecycle.training_queue(job), placement.get("class"))


def _panels_context(db, project: Project, job: Job, unserved: str | None) -> dict[str, Any]:
    """What the job page's panels other than the status and the event log show."""
    checkpoints = jobs_service.checkpoints(db, project, job.id, after=None, limit=100).items
    return {
        "job": job, "row": views.job_row(job), "fine_tuned_model": job.fine_tuned_model, "failure": views.failure(job),
        "checkpoints": [views.checkpoint_row(job.id, c) for c in checkpoints],
        "spec": views.spec_settings(job.spec), "hyperparameters": views.hyperparameter_settings(job.hyperparameters,
                                                                                                job.spec),
        "evals": views.eval_comparison(job),
        "plan": views.plan_view(job.plan, job.placement, unserved=unserved),
        "version": views.panel_version(job, checkpoints[0].id if checkpoints else None, unserved),
    }


def _job_context(db, settings: Settings, project: Project, job: Job) -> dict[str, Any]:
    events, metrics = _events(db, project, job.id)
    series = views.metrics_series(metrics)
    return {**_panels_context(db, project, job, _unserved(db, job)), "events": events, "series": series,
            "events_shown": EVENTS_SHOWN,
            "since": events[0].id if events else "",
            "chart": {**series.as_json(), "total_steps": (job.progress or {}).get("total_steps")}}


# Re-rendered by a poll only when the job's panel version changes; the status panel is small and always sent.
PANEL_FRAGMENTS = {"job-evals": "_job_evals.html", "job-checkpoints": "_job_checkpoints.html",
                   "job-settings": "_job_settings.html", "job-plan": "_job_plan.html",
                   "job-answers": "_job_answers.html"}


@router.get("/jobs/new")
def new_job_page(request: Request, db: SessionDep, settings: SettingsDep, project: DashboardProject,
                 training_file: str | None = None, clone: str | None = None) -> HTMLResponse:
    """The new-job form; `clone=JOB_ID` fills it with that job's model, files and settings."""
    if clone:
        values = forms.values_of_job(jobs_service.get(db, project, clone))
        return _new_job_form(request, db, settings, project, values=values, cloned_from=clone)
    return _new_job_form(request, db, settings, project, values={"training_file": training_file or ""})


def _new_job_form(request: Request, db, settings, project: Project, *, values: dict[str, str],
                  error: LorajobsError | None = None, plan: dict | None = None,
                  cloned_from: str | None = None) -> HTMLResponse:
    knobs = forms.knob_fields()
    datasets = [f for f in files_service.page(db, project, purpose="fine-tune", after=None, limit=FILES_PER_PAGE,
                                              order="desc").items if f.status == "processed"]
    base_models = [m.id for m in models_service.list_all(db, settings, project)
                   if m.owned_by == models_service.CATALOGUE_OWNER]
    names = ["model", "training_file", "validation_file", "suffix"] + [k.name for k in knobs]
    error_field = forms.field_for_param(error.param, names) if error else None
    return render(request, "new_job.html", status_code=error.status_code if error else 200, project=project,
                  knobs=knobs, datasets=datasets, base_models=base_models, values=values, error=error,
                  error_field=error_field,
                  error_message=forms.inline_message(error) if error else None, cloned_from=cloned_from,
                  plan=views.plan_view(plan or (error.extra.get("plan") if error else None)))


async def form_values(request: Request) -> dict[str, str]:
    """Every text field of a submitted form (the new-job form's field names are the spec's dotted params)."""
    return {key: value for key, value in (await request.form()).items() if isinstance(value, str)}


@router.post("/jobs/new", dependencies=[CsrfChecked])
def create_job(request: Request, db: SessionDep, settings: SettingsDep, project: DashboardProject,
               values: Annotated[dict[str, str], Depends(form_values)]) -> Response:
    check_only = values.get("action") == "plan"
    try:
        created = jobs_service.create(db, settings, project, forms.job_create(values, dry_run=check_only))
    except (InvalidRequest, QuotaExceeded) as exc:  # shown on the form, not as the API's JSON
        return _new_job_form(request, db, settings, project, values=values, error=exc)
    if check_only:
        return _new_job_form(request, db, settings, project, values=values, plan=created.model_dump(mode="json"))
    return _see_other(f"/jobs/{created.id}")


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: str, db: SessionDep, settings: SettingsDep,
             project: DashboardProject) -> HTMLResponse:
    job = jobs_service.get(db, project, job_id)
    context = _job_context(db, settings, project, job)
    return render(request, "job.html", project=project, poll_url=f"{POLL_PREFIX}/jobs/{quote(job.id)}",
                  poll_since=context["since"], poll_version=context["version"], **context)


def _new_events(db, project: Project, job_id: str, since: str | None) -> tuple[list, bool, bool]:
    """Events after the cursor, oldest first, and whether more wait; an unknown cursor (a resumed run dropped its
    metrics) starts over from the newest events, `reset`."""
    if since:
        try:
            page = jobs_service.events(db, project, job_id, after=since, limit=EVENTS_PER_POLL, order="asc")
            return page.items, page.has_more, False
        except InvalidRequest:
            pass
    page = jobs_service.events(db, project, job_id, after=None, limit=EVENTS_SHOWN)
    return page.items[::-1], False, True


@router.get(f"{POLL_PREFIX}/jobs/{{job_id}}")
def job_poll(request: Request, job_id: str, db: SessionDep, settings: SettingsDep, project: DashboardProject,
             since: str | None = None, v: str | None = None) -> dict:
    """What changed since the client's last event id `since` and panel version `v`: new events and chart points,
    the status panel, a small summary, and the other panels only when their version moved."""
    job = jobs_service.get(db, project, job_id)
    events, more, reset = _new_events(db, project, job.id, since)
    row = views.job_row(job)
    total_steps = (job.progress or {}).get("total_steps")
    if reset:  # the chart is rebuilt from every metrics event, as on a page load
        _, metrics = _events(db, project, job.id)
    else:
        metrics = [event for event in events if event.type == "metrics"]
    shown = [views.event_row(event) for event in reversed(events)]
    update: dict[str, Any] = {
        "summary": views.row_summary(row),
        "events": {"html": fragment(request, "_job_event_items.html", events=shown) if shown else "",
                   "since": events[-1].id if events else since, "more": more, "reset": reset},
        "chart": {**views.metrics_series(metrics).as_json(), "total_steps": total_steps, "reset": reset},
        "fragments": {"job-status": fragment(request, "_job_status.html", job=job, row=row,
                                             fine_tuned_model=job.fine_tuned_model, failure=views.failure(job))},
        "done": views.is_finished(job.status) and not more,
    }
    newest_checkpoint = jobs_service.checkpoints(db, project, job.id, after=None, limit=1).items
    unserved = _unserved(db, job)
    version = views.panel_version(job, newest_checkpoint[0].id if newest_checkpoint else None, unserved)
    update["version"] = version
    if version != v:
        context = _panels_context(db, project, job, unserved)
        update["fragments"].update({key: fragment(request, template, **context)
                                    for key, template in PANEL_FRAGMENTS.items()})
    return update


@router.post("/jobs/{job_id}/cancel", dependencies=[CsrfChecked])
def cancel_job(job_id: str, db: SessionDep, project: DashboardProject) -> RedirectResponse:
    try:
        jobs_service.cancel(db, project, job_id)
    except Conflict:
        pass  # it finished meanwhile: the job page shows how
    return _see_other(f"/jobs/{quote(job_id)}")


@router.get("/jobs/{job_id}/adapter")
def download_adapter(job_id: str, db: SessionDep, storage: StorageDep, project: DashboardProject,
                     checkpoint: str | None = None, format: str = "tar.gz") -> Response:
    """Streamed through the app, so a browser that cannot reach object storage still gets the file."""
    fmt = format if format in artifacts.MEDIA_TYPES else "tar.gz"
    archive = artifacts.adapter_archive(db, storage, project, job_id, fmt=fmt, checkpoint_id=checkpoint)
    return artifacts.respond(storage, archive, redirect=False)


# --- files -----------------------------------------------------------------------------------------------------


def _files_context(db, project: Project) -> dict[str, Any]:
    page = files_service.page(db, project, purpose="fine-tune", after=None, limit=FILES_PER_PAGE, order="desc")
    return {"rows": [views.file_row(row) for row in page.items], "has_more": page.has_more}


@router.get("/files")
def files_page(request: Request, db: SessionDep, settings: SettingsDep, project: DashboardProject) -> HTMLResponse:
    return render(request, "files.html", project=project, poll_url=f"{POLL_PREFIX}/files",
                  max_upload=views.size(settings.max_upload_bytes), **_files_context(db, project))


@router.get(f"{POLL_PREFIX}/files")
def files_poll(request: Request, db: SessionDep, project: DashboardProject) -> dict:
    context = _files_context(db, project)
    pending = any(row.status == "uploaded" for row in context["rows"])
    return {"fragments": {"file-rows": fragment(request, "_file_rows.html", **context)}, "done": not pending}


@router.post("/files", dependencies=[CsrfChecked])
def upload_file(request: Request, file: UploadFile, db: SessionDep, settings: SettingsDep, storage: StorageDep,
                project: DashboardProject) -> Response:
    try:
        row = files_service.upload(db, settings, storage, project, stream=file.file, filename=file.filename,
                                   purpose="fine-tune", declared_size=file.size)
    except (InvalidRequest, PayloadTooLarge, QuotaExceeded) as exc:
        return render(request, "files.html", status_code=exc.status_code, project=project, upload_error=exc.message,
                      poll_url=f"{POLL_PREFIX}/files", max_upload=views.size(settings.max_upload_bytes),
                      **_files_context(db, project))
    return _see_other(f"/files/{row.id}")


def _file_context(db, project: Project, file_id: str) -> dict[str, Any]:
    row = files_service.get(db, project, file_id)
    return {"file": views.file_row(row), "report": row.report, "sha256": row.sha256}


@router.get("/files/{file_id}")
def file_page(request: Request, file_id: str, db: SessionDep, project: DashboardProject) -> HTMLResponse:
    context = _file_context(db, project, file_id)
    return render(request, "file.html", project=project, poll_url=f"{POLL_PREFIX}/files/{quote(file_id)}", **context)


@router.get(f"{POLL_PREFIX}/files/{{file_id}}")
def file_poll(request: Request, file_id: str, db: SessionDep, project: DashboardProject) -> dict:
    context = _file_context(db, project, file_id)
    return {"fragments": {"file-report": fragment(request, "_file_report.html", **context)},
            "done": context["file"].status != "uploaded"}

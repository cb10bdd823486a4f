"""The owner console's pages and forms (:mod:`.console`): each form calls one service method, the one the
CLI and the owner API call, with the owner the session's token gives; then it redirects (post/redirect/get)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from voxgrid.privacy import report as privacy_report
from voxgrid.wire import ApprovalDecision, BudgetSet, PolicyRules

from voxgrid.nodes.http import console_views as views
from voxgrid.nodes.http.console import Console, ConsoleError, Owner, Posted, parse, see_other
from voxgrid.nodes.http.console_sessions import COOKIE, MAX_AGE_S
from voxgrid.nodes.service.audit_search import audit_actors, search_audit
from voxgrid.nodes.service.node import Unauthorized
from voxgrid.nodes.service.store import POLICIES


class LoginForm(BaseModel):
    token: str = Field(min_length=1, max_length=512)
    next: str = "/requests"


class PolicyForm(BaseModel):
    """A dataset's policy; with ``rules``, the rules' fields too (unset ones: the node's defaults)."""

    dataset: str = Field(min_length=1, max_length=256)
    policy: str = Field(min_length=1, max_length=32)
    require_dp: bool | None = None
    max_epsilon_per_release: float | None = None
    max_epsilon_per_approval: float | None = None
    networks: str | None = Field(None, max_length=1000)
    max_patch_size: int | None = None
    max_rounds: int | None = None
    days: float | None = None

    def rules(self) -> PolicyRules | None:
        given = self.model_dump(exclude={"dataset", "policy"}, exclude_none=True)
        if "networks" in given:
            given["networks"] = [n.strip() for n in given["networks"].split(",") if n.strip()]
        if given and self.policy != "rules":
            raise ConsoleError(422, "Invalid form", f"rules ({', '.join(given)}) apply only to the 'rules' policy. "
                                                    "Nothing was changed.")
        return parse(PolicyRules, given) if given else None


def _cookie(response, sid: str) -> None:
    # __Host-: only over HTTPS, for this host and every path of it, never set by another subdomain.
    response.set_cookie(COOKIE, sid, max_age=MAX_AGE_S, path="/", secure=True, httponly=True, samesite="strict")


def add_routes(app: FastAPI, console: Console, Viewer, Post) -> None:
    """Every page and form of the console."""
    _login_routes(app, console)
    _request_routes(app, console, Viewer, Post)
    _settings_routes(app, console, Viewer, Post)
    _record_routes(app, console, Viewer)


def _login_routes(app: FastAPI, console: Console) -> None:
    @app.get("/")
    def home():
        return see_other("/requests")

    @app.get("/login")
    def login_form(request: Request, next: str = "/requests"):
        session = console.sessions.get(request.cookies.get(COOKIE))
        if session is not None and session.token is not None:
            return see_other(views.local_path(next))
        session = session or console.sessions.new()  # anonymous: its CSRF token guards the login form too
        response = console.page("login.html", session, next=views.local_path(next), error=None)
        _cookie(response, session.sid)
        return response

    @app.post("/login")
    async def login(request: Request):
        session, form = await console.checked_form(request)
        creds = parse(LoginForm, form)
        nxt = views.local_path(creds.next)
        try:
            caller = await run_in_threadpool(console.service.authenticate, creds.token)
        except Unauthorized:
            return console.page("login.html", session, 401, next=nxt,
                                error="That token is not valid at this node (unknown, revoked or expired).")
        if caller.role != "owner":
            return console.page("login.html", session, 403, next=nxt,
                                error=f"That is a {caller.role}'s token; the console is for the node's owner.")
        console.sessions.drop(session.sid)  # a new id once logged in: an id known before the login is worthless
        owner = console.sessions.new(creds.token, caller.name)
        response = see_other(nxt)
        _cookie(response, owner.sid)
        return response

    @app.post("/logout")
    async def logout(request: Request):
        session, _ = await console.checked_form(request)
        console.sessions.drop(session.sid)
        response = see_other("/login")
        response.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        return response


def _request_routes(app: FastAPI, console: Console, Viewer, Post) -> None:
    approvals = console.service.approvals

    @app.get("/requests")
    def requests_page(o: Owner = Viewer):
        everything = approvals.requests(o.caller)
        pending = [r for r in everything if r.state == "pending"]
        decided = [r for r in everything if r.state != "pending"][:100]
        return console.page("requests.html", o.session, pending=pending, decided=decided, v=views)

    @app.get("/requests/{request_id}")
    def request_page(request_id: str, o: Owner = Viewer):
        r = approvals.get(o.caller, request_id)
        return console.page("request.html", o.session, r=r, view=views.request_view(r), v=views)

    @app.post("/requests/{request_id}/approve")
    def approve(request_id: str, p: Posted = Post):
        d = parse(ApprovalDecision, p.form)
        r = approvals.approve(p.owner.caller, request_id, d.releases, d.days)
        p.owner.session.flash = (f"Request {r.request_id} approved: {r.releases} release(s) of plan "
                                 f"{r.plan_hash[:16]}… for {r.scientist} on {r.dataset}, until {views.when(r.expires)}.")
        return see_other(f"/requests/{request_id}")

    @app.post("/requests/{request_id}/deny")
    def deny(request_id: str, p: Posted = Post):
        d = parse(ApprovalDecision, p.form)
        r = approvals.deny(p.owner.caller, request_id, d.reason or "")
        p.owner.session.flash = f"Request {r.request_id} denied; {r.scientist} sees your reason."
        return see_other(f"/requests/{request_id}")

    @app.post("/requests/{request_id}/revoke")
    def revoke(request_id: str, p: Posted = Post):
        d = parse(ApprovalDecision, p.form)
        r = console.service.revoke_approval(p.owner.caller, request_id, d.reason)  # as the owner API: jobs stop too
        p.owner.session.flash = (f"Approval {r.request_id} revoked: later jobs are refused, and its queued and "
                                 "running jobs are cancelled.")
        return see_other(f"/requests/{request_id}")


def _settings_routes(app: FastAPI, console: Console, Viewer, Post) -> None:
    service = console.service

    @app.get("/policies")
    def policies_page(o: Owner = Viewer):
        return console.page("policies.html", o.session, policies=service.approvals.policies(o.caller),
                            choices=POLICIES)

    @app.post("/policies")
    def set_policy(p: Posted = Post):
        f = parse(PolicyForm, p.form)
        info = service.approvals.set_policy(p.owner.caller, f.dataset, f.policy, f.rules())
        p.owner.session.flash = f"Dataset {info.dataset} is now '{info.policy}'."
        return see_other("/policies")

    @app.get("/budgets")
    def budgets_page(o: Owner = Viewer):
        view = service.ledger_view(o.caller)
        summary = privacy_report.summary_table(privacy_report.build(service.ledger)["summary"])
        return console.page("budgets.html", o.session, budgets=view.budgets, summary=summary, v=views,
                            datasets=[d.name for d in service.datasets(o.caller)])

    @app.post("/budgets")
    def set_budget(p: Posted = Post):
        req = parse(BudgetSet, p.form)
        service.set_budget(p.owner.caller, req)
        p.owner.session.flash = (f"Budget on {req.dataset} for {req.scientist or 'all scientists together'}: "
                                 f"ε {req.epsilon:g} at δ={req.delta:g}.")
        return see_other("/budgets")

    @app.get("/tokens")
    def tokens_page(o: Owner = Viewer):
        return console.page("tokens.html", o.session, tokens=service.tokens(o.caller), v=views, me=o.caller.name)

    @app.post("/tokens/{token_id}/revoke")
    def revoke_token(token_id: str, p: Posted = Post):
        t = service.revoke_token(p.owner.caller, token_id)
        p.owner.session.flash = f"Token {t.id} of {t.name} ({t.role}) revoked: refused from the next request on."
        return see_other("/tokens")


def _record_routes(app: FastAPI, console: Console, Viewer) -> None:
    service = console.service

    @app.get("/audit")
    def audit_page(o: Owner = Viewer, actor: str = "", action: str = "", since: str = "", until: str = "",
                   limit: int = 200):
        if not 1 <= limit <= 2000:
            raise ConsoleError(422, "Invalid filter", f"limit must be from 1 to 2000, got {limit}")
        entries = search_audit(service, o.caller, actor or None, action or None, since or None, until or None, limit)
        filters = {"actor": actor, "action": action, "since": since, "until": until, "limit": limit}
        return console.page("audit.html", o.session, entries=entries, actors=audit_actors(service, o.caller),
                            filters=filters, v=views)

    @app.get("/privacy")
    def privacy_page(o: Owner = Viewer):
        body = privacy_report.render_body(privacy_report.build(service.ledger))
        return console.page("privacy.html", o.session, report=body)

    @app.get("/privacy-report.html")
    def privacy_file(o: Owner = Viewer):
        # The very page 'voxgrid privacy report' writes, to keep or send on.
        page = privacy_report.render_html(privacy_report.build(service.ledger))
        return HTMLResponse(page, headers={"Content-Disposition": 'attachment; filename="privacy-report.html"'})

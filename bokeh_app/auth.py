"""Login for the dashboard's controls (a Bokeh auth provider).

Anyone who can reach the server may LOOK (``get_user`` answers ``guest`` without a login);
creating, starting, pausing, resuming or stopping bots needs a login: ``/login`` checks
``TCP_DASHBOARD_USER`` / ``TCP_DASHBOARD_PASSWORD`` (constant-time) and sets a signed cookie
(``TCP_DASHBOARD_COOKIE_SECRET``, else a random secret per server start). The pages read that
cookie (the server includes cookies in the session context) with :func:`session_user` and every
control checks it on the SERVER before it acts, so hiding a button is never the protection.
Without ``TCP_DASHBOARD_PASSWORD`` nobody can log in: the dashboard is read-only.

With ``bokeh serve``: ``bokeh serve bokeh_app --auth-module bokeh_app/auth.py --include-cookies
--cookie-secret $TCP_DASHBOARD_COOKIE_SECRET`` (this module's functions read the settings).
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from typing import Any

from bokeh.server.auth_provider import AuthProvider
from tornado.web import RequestHandler, decode_signed_value

from tcp.config import Settings

__all__ = ["COOKIE", "GUEST", "Credentials", "DashboardAuth", "session_user"]

COOKIE = "tcp_user"
GUEST = "guest"
_MAX_AGE_DAYS = 7

_PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>TCP Dashboard: log in</title></head>
<body style="font-family: sans-serif; max-width: 28em; margin: 4em auto">
<h2>TCP Dashboard</h2><p>{message}</p>
<form method="post" action="/login">{xsrf}
<p><label>User <input name="username" autocomplete="username" autofocus></label></p>
<p><label>Password <input name="password" type="password" autocomplete="current-password"></label></p>
<input type="hidden" name="next" value="{next}">
<p><button type="submit" id="login">Log in</button> <a href="/">back to the dashboard (read-only)</a></p>
</form></body></html>"""


@dataclass(frozen=True)
class Credentials:
    """Who may log in, and the secret that signs the cookie (from the settings: environment)."""

    user: str
    password: str | None
    cookie_secret: str

    @classmethod
    def from_settings(cls, settings: Settings) -> Credentials:
        password = settings.dashboard_password
        secret = settings.dashboard_cookie_secret
        return cls(
            settings.dashboard_user,
            None if password is None else password.get_secret_value(),
            secrets.token_urlsafe(32) if secret is None else secret.get_secret_value(),
        )

    def check(self, user: str, password: str) -> bool:
        if self.password is None:
            return False
        ok_user = hmac.compare_digest(user.encode(), self.user.encode())
        ok_password = hmac.compare_digest(password.encode(), self.password.encode())
        return ok_user and ok_password

    def user_of(self, cookie: str | bytes | None) -> str | None:
        """The logged-in user a signed cookie value names, or ``None``."""
        if not cookie:
            return None
        value = decode_signed_value(self.cookie_secret, COOKIE, cookie, max_age_days=_MAX_AGE_DAYS)
        return None if value is None else value.decode()


def session_user(credentials: Credentials, cookies: dict[str, Any] | None) -> str | None:
    """The logged-in user of a Bokeh session (its request cookies), or ``None`` for a guest."""
    value = (cookies or {}).get(COOKIE)
    return credentials.user_of(value)


def _login_handler(credentials: Credentials) -> type[RequestHandler]:
    class LoginHandler(RequestHandler):
        def get(self) -> None:
            self._page("Log in to control bots.")

        def post(self) -> None:
            user = self.get_argument("username", "")
            password = self.get_argument("password", "")
            if not credentials.check(user, password):
                self.set_status(403)
                reason = (
                    "Controls are disabled: TCP_DASHBOARD_PASSWORD is not set."
                    if credentials.password is None
                    else "Wrong user or password."
                )
                self._page(reason)
                return
            self.set_secure_cookie(COOKIE, user, expires_days=_MAX_AGE_DAYS, httponly=True, samesite="Strict")
            target = self.get_argument("next", "/")
            self.redirect(target if target.startswith("/") and not target.startswith("//") else "/")

        def _page(self, message: str) -> None:
            target = self.get_argument("next", "/")
            self.write(_PAGE.format(message=message, xsrf=self.xsrf_form_html(), next=_escape(target)))

    return LoginHandler


class _LogoutHandler(RequestHandler):
    def get(self) -> None:
        self.clear_cookie(COOKIE)
        self.redirect("/")


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;").replace(">", "&gt;")


class DashboardAuth(AuthProvider):
    """Bokeh's auth provider for the dashboard (see the module docstring)."""

    def __init__(self, credentials: Credentials) -> None:
        self.credentials = credentials
        super().__init__()

    @property
    def get_user(self) -> Any:
        credentials = self.credentials

        def get_user(request_handler: RequestHandler) -> str:
            return credentials.user_of(request_handler.get_cookie(COOKIE)) or GUEST

        return get_user

    @property
    def login_url(self) -> str:
        return "/login"

    @property
    def login_handler(self) -> type[RequestHandler]:
        return _login_handler(self.credentials)

    @property
    def logout_url(self) -> str:
        return "/logout"

    @property
    def logout_handler(self) -> type[RequestHandler]:
        return _LogoutHandler


# ``bokeh serve --auth-module bokeh_app/auth.py``: the same provider, built from the environment.
_module_auth: DashboardAuth | None = None


def _provider() -> DashboardAuth:
    global _module_auth
    if _module_auth is None:
        _module_auth = DashboardAuth(Credentials.from_settings(Settings.load()))
    return _module_auth


def get_user(request_handler: RequestHandler) -> str:
    return _provider().get_user(request_handler)


login_url = "/login"
logout_url = "/logout"


def __getattr__(name: str) -> Any:
    if name == "LoginHandler":
        return _provider().login_handler
    if name == "LogoutHandler":
        return _LogoutHandler
    raise AttributeError(name)

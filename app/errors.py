"""The one shape of a user-caused error, and the one place that turns it into an HTTP answer.

Every service raises a subclass of `AppError` (BatchError, LabelingError, RegistryError, ...): it carries
the HTTP status, a stable machine-readable `code`, the `field` (or file `line`) it is about and a message
that is safe to show. Routes do not catch them: `install` registers handlers that answer `/api/` callers
with JSON of one shape (`ErrorOut`, also used for FastAPI's own 422s, HTTPExceptions and the 503) and
browsers with the error page. A page whose form should come back with the message instead declares it
with `renders_on_error`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:  # the worker imports the services, hence this module: it stays free of the web framework
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException as StarletteHTTPException

M = TypeVar("M", bound=BaseModel)

# Stable codes clients can switch on; the status alone is too coarse for some (409 vs 422 is not "what").
CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "rate_limited",
    503: "unavailable",
}


def code_for(status: int) -> str:
    """Returns the machine-readable code of an HTTP status."""
    return CODES.get(status, "error")


class AppError(ValueError):
    """A user-caused problem: `field` (or `line`) says what, `message` why, `status` and `code` how to answer.

    A ValueError, as every service error was before there was one base, so older handlers of ValueError hold.
    """

    status: int = 422

    def __init__(
        self,
        field: str | None,
        message: str,
        status: int | None = None,
        *,
        code: str | None = None,
        line: int | None = None,
    ):
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.message = message
        if status is not None:
            self.status = status
        self.code = code or code_for(self.status)
        self.line = line

    @property
    def detail(self) -> str:
        """The one-line text clients read today: 'field: message'."""
        return str(self)


class FieldError(AppError):
    """An AppError about one field, 422 unless told otherwise (the services' errors subclass it)."""

    def __init__(self, field: str, message: str, status: int = 422):
        super().__init__(field, message, status)


class Invalid(AppError):
    """422: the value given cannot be used."""

    status = 422


class Unauthorized(AppError):
    """401: who is asking is not known."""

    status = 401


class Forbidden(AppError):
    """403: the caller may not do this."""

    status = 403


class NotFound(AppError):
    """404: no such thing."""

    status = 404


class Conflict(AppError):
    """409: the thing exists, but its state does not allow this."""

    status = 409


class RateLimited(AppError):
    """429: too many attempts; wait."""

    status = 429


class FormInvalid(Invalid):
    """422 for a form: every problem found, each as a sentence in words ("Temperature must be at most 10.").

    `field` is the first bad field (for the API's shape); `problems` lists (field, sentence) for the page.
    """

    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__(problems[0][0], " ".join(sentence for _, sentence in problems))
        self.problems = problems

    def __str__(self) -> str:
        return self.message


# How pydantic's error types read in a sentence after the field's label; `{...}` names come from the error's ctx.
_WORDS = {
    "missing": "is required",
    "less_than_equal": "must be at most {le}",
    "less_than": "must be less than {lt}",
    "greater_than_equal": "must be at least {ge}",
    "greater_than": "must be more than {gt}",
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "int_type": "must be a whole number",
    "float_parsing": "must be a number",
    "float_type": "must be a number",
    "finite_number": "must be a finite number",
    "bool_parsing": "must be yes or no",
    "string_too_long": "must be at most {max_length} characters long",
    "literal_error": "must be one of {expected}",
    "enum": "must be one of {expected}",
    "extra_forbidden": "is not a field of this form",
}


def field_label(model: type[BaseModel], name: str) -> str:
    """The words a form uses for a field: its `title`, else its name with spaces."""
    info = model.model_fields.get(name)
    if info is not None and info.title:
        return info.title
    return name.replace("_", " ").capitalize()


def _sentence(model: type[BaseModel], err: Mapping[str, Any]) -> tuple[str, str]:
    loc = [str(part) for part in err.get("loc", ())]
    name = ".".join(loc) or "form"
    label = field_label(model, loc[0]) if loc else "The form"
    ctx = err.get("ctx") or {}
    kind = err.get("type", "")
    if kind == "string_too_short":
        words = "must not be empty" if ctx.get("min_length") == 1 else "must be at least {min_length} characters long"
    elif kind == "value_error" and "error" in ctx:
        words = str(ctx["error"])  # our own validators' reasons, e.g. "contains a NUL character"
    else:
        words = _WORDS.get(kind, "is not valid ({msg})")
    limits = {k: f"{v:g}" if isinstance(v, float) else v for k, v in ctx.items() if k != "msg"}  # 10, not 10.0
    words = words.format(msg=err.get("msg", ""), **limits)
    return name, f"{label} {words}."


def validation_problems(model: type[BaseModel], exc: ValidationError) -> list[tuple[str, str]]:
    """Every problem pydantic found, as (field, sentence in words), in the model's field order."""
    return [_sentence(model, err) for err in exc.errors()]


def validated(model: type[M], data: Any) -> M:
    """Validates form data with an API model, raising Invalid that names the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise Invalid(".".join(str(part) for part in err["loc"]) or "form", err["msg"]) from exc


def validated_form(model: type[M], data: Any) -> M:
    """Validates a page's form with an API model, raising FormInvalid with every problem, in words."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise FormInvalid(validation_problems(model, exc)) from exc


# --- pages that show their form again -------------------------------------------------------------


def renders_on_error(page: Callable[..., Response]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declares the page a route answers with when it raises an AppError: `page(exc, **route_arguments)`.

    Put it under the router's decorator. The page is rendered inside the route, not by the app's handler:
    there the request's session is still open (the page lists models, batches...) and, as before this
    existed, what the request did outside the failed savepoint is still committed.
    """

    def decorate(route: Callable[..., Any]) -> Callable[..., Any]:
        if inspect.iscoroutinefunction(route):

            @functools.wraps(route)
            async def async_wrapper(**kwargs: Any) -> Any:
                try:
                    return await route(**kwargs)
                except AppError as exc:
                    return page(exc, **kwargs)

            return async_wrapper

        @functools.wraps(route)
        def wrapper(**kwargs: Any) -> Any:
            try:
                return route(**kwargs)
            except AppError as exc:
                return page(exc, **kwargs)

        return wrapper

    return decorate


# --- answers ---------------------------------------------------------------------------------------


def error_body(
    status: int,
    message: str,
    field: str | None = None,
    *,
    detail: str | None = None,
    code: str | None = None,
    line: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Builds the JSON of every 4xx/5xx answer (`ErrorOut`)."""
    body: dict[str, Any] = {
        "detail": detail if detail is not None else (f"{field}: {message}" if field else message),
        "code": code or code_for(status),
        "field": field,
        "message": message,
    }
    if line is not None:
        body["line"] = line
    return body | extra


def wants_html(request: Request) -> bool:
    """Tells whether the caller is a browser on a page (not the API), so errors come as the error page."""
    return not request.url.path.startswith("/api/") and "text/html" in request.headers.get("accept", "")


def _json(body: dict[str, Any], status: int, headers: Mapping[str, str] | None = None) -> Response:
    from fastapi.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


# The error page's heading per status, in words; the message under it says what happened.
PAGE_TITLES = {
    400: "Bad request",
    401: "Please log in",
    403: "Not allowed",
    404: "Page not found",
    405: "Wrong kind of request",
    409: "Not possible right now",
    413: "Too large",
    415: "Unsupported file",
    422: "Something is wrong with what was sent",
    429: "Too many attempts",
    500: "Something went wrong",
    503: "Unavailable for a moment",
}
SERVER_ERROR_MESSAGE = "Something went wrong on our side; the error was logged. Please try again, or tell an admin."


def _page_message(request: Request, status: int, message: str) -> str:
    """Starlette's own answers in words: "Not Found" says nothing about what was not found."""
    if status == 404 and message == "Not Found":
        return f"There is no page at {request.url.path}."
    if status == 405 and message == "Method Not Allowed":
        return f"{request.url.path} does not answer a {request.method} request: open it from its link or its form."
    return message


def _error_page(request: Request, status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    """The one error page: styled, with the signed-in user's navigation when they are known."""
    from app.templating import templates

    viewer = getattr(request.state, "viewer", None)
    context = {
        "status": status,
        "title": PAGE_TITLES.get(status, "Error"),
        "message": _page_message(request, status, message),
        "user": viewer.user if viewer is not None else None,
        "csrf_token": viewer.csrf_token if viewer is not None else "",
    }
    return templates.TemplateResponse(request, "error.html", context, status_code=status, headers=headers)


def app_error_response(request: Request, exc: AppError) -> Response:
    """Answers an AppError: the error page for browsers (the message in words), ErrorOut JSON for everyone else."""
    if wants_html(request):
        return _error_page(request, exc.status, exc.message)
    return _json(error_body(exc.status, exc.message, exc.field, code=exc.code, line=exc.line), exc.status)


def http_error_response(request: Request, exc: StarletteHTTPException) -> Response:
    """Answers an HTTPException (ours, or Starlette's 404/405) like an AppError without a field."""
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if wants_html(request) and exc.status_code >= 400:
        return _error_page(request, exc.status_code, message, exc.headers)
    return _json(error_body(exc.status_code, message), exc.status_code, exc.headers)


def server_error_response(request: Request) -> Response:
    """Answers a bug (500): the error page or ErrorOut JSON, never the exception's text."""
    if wants_html(request):
        return _error_page(request, 500, SERVER_ERROR_MESSAGE)
    return _json(error_body(500, SERVER_ERROR_MESSAGE), 500)


def _field_errors(exc: RequestValidationError) -> list[dict]:
    errors = []
    for err in exc.errors():
        loc = [str(part) for part in err.get("loc", ()) if part not in ("body", "query", "path", "header", "form")]
        errors.append({"field": ".".join(loc) or "body", "message": err.get("msg", "invalid value")})
    return errors


def validation_error_response(request: Request, exc: RequestValidationError) -> Response:
    """Answers FastAPI's own 422: every problem in `errors`, the first one as field and message."""
    errors = _field_errors(exc)
    summary = "; ".join(f"{e['field']}: {e['message']}" for e in errors)
    if wants_html(request):
        return _error_page(request, 422, summary)
    first: dict[str, Any] = errors[0] if errors else {"field": None, "message": "invalid request"}
    return _json(error_body(422, first["message"], first["field"], detail=summary, errors=errors), 422)


def install(app: FastAPI, identify: Callable[[Request], Awaitable[None]] | None = None) -> None:
    """Registers the error handlers and documents ErrorOut on every /api/v1 operation's 4xx answers.

    `identify(request)` sets `request.state.viewer` for an error page no route's dependencies reached
    (an unknown URL, a wrong method, a bug), so the page still shows the signed-in user's navigation.
    """
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    async def on_app_error(request: Request, exc: Exception) -> Response:
        return app_error_response(request, exc)  # type: ignore[arg-type]

    async def on_http_error(request: Request, exc: Exception) -> Response:
        if wants_html(request) and identify is not None:
            await identify(request)
        return http_error_response(request, exc)  # type: ignore[arg-type]

    async def on_server_error(request: Request, exc: Exception) -> Response:
        # Starlette logs the exception and re-raises it to the server after this answer is sent.
        if wants_html(request) and identify is not None:
            await identify(request)
        return server_error_response(request)

    async def on_validation_error(request: Request, exc: Exception) -> Response:
        return validation_error_response(request, exc)  # type: ignore[arg-type]

    app.add_exception_handler(AppError, on_app_error)
    # Starlette's class, so its own 404 and 405 answers take the same shape as FastAPI's HTTPException.
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(500, on_server_error)

    def openapi() -> dict:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(FastAPI.openapi(app))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


# --- OpenAPI ---------------------------------------------------------------------------------------

ERROR_SCHEMAS = {
    "ErrorOut": {
        "title": "ErrorOut",
        "type": "object",
        "description": "Every 4xx and 5xx answer of the API.",
        "required": ["detail", "code", "field", "message"],
        "properties": {
            "detail": {"type": "string", "description": "What is wrong, naming the field: 'field: problem; ...'"},
            "code": {
                "type": "string",
                "description": "Stable machine-readable kind of error",
                "examples": sorted(set(CODES.values())),
            },
            "field": {
                "anyOf": [{"type": "string"}, {"type": "null"}],
                "description": "The field or parameter at fault (the first one for a 422), e.g. items.2.likert",
            },
            "message": {"type": "string", "description": "Why, without the field's name"},
            "line": {"type": "integer", "description": "Line of an uploaded file, for import errors"},
            "errors": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/ValidationError"},
                "description": "422: every problem found, not only the first",
            },
        },
    },
    "ValidationError": {
        "title": "ValidationError",
        "type": "object",
        "required": ["message"],
        "properties": {
            "field": {"anyOf": [{"type": "string"}, {"type": "null"}], "description": "e.g. items.2.likert"},
            "message": {"type": "string"},
            "line": {"type": "integer", "description": "Line of an uploaded file, for import errors"},
        },
    },
}
ERROR_REF = "#/components/schemas/ErrorOut"
# Answers every API operation can give: no or a bad token, a missing scope or CSRF token, and any other 4xx.
COMMON_ERRORS = {"401": "Not authenticated", "403": "Not allowed"}
OTHER_ERRORS = {"4XX": "Any other client error"}


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    """Points every 4xx response of every /api/v1 operation at ErrorOut, the shape the handlers send."""
    schemas = schema.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.update(ERROR_SCHEMAS)
    for path, operations in schema.get("paths", {}).items():
        if not path.startswith("/api/v1/"):
            continue
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            wanted = COMMON_ERRORS | ({"404": "Not found"} if "{" in path else {}) | OTHER_ERRORS
            for status, description in wanted.items():
                responses.setdefault(status, {"description": description})
            for status, response in responses.items():
                if status.startswith("4"):
                    response["content"] = {"application/json": {"schema": {"$ref": ERROR_REF}}}
    return schema

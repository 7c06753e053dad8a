"""API errors: one hierarchy, rendered as the standard's problem+json body.

Every error a client can see is an :class:`ApiError` with an HTTP status, a machine
``code``, a human ``title`` and ``detail``, and for validation errors ``invalidParams``
(``[{name, code, reason}]``). What only an operator needs goes to the log instead.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field


@dataclass(frozen=True)
class InvalidParam:
    name: str
    code: str
    reason: str

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "code": self.code, "reason": self.reason}


@dataclass
class ApiError(Exception):
    status: int
    code: str
    title: str
    detail: str
    invalid_params: list[InvalidParam] = field(default_factory=list)
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.detail}"

    def body(self, instance: str) -> dict[str, object]:
        problem: dict[str, object] = {
            "type": f"urn:koerier:fout:{self.code}",
            "code": self.code,
            "title": self.title,
            "status": self.status,
            "detail": self.detail,
            "instance": instance,
        }
        if self.invalid_params or self.status == 400:
            problem["invalidParams"] = [param.as_dict() for param in self.invalid_params]
        return problem


def new_instance() -> str:
    """A reference to one occurrence of an error; it is logged with the same value."""
    return f"urn:uuid:{uuid.uuid4()}"


# A body of any size can break the schema in as many places as it has values; the answer
# must stay small, so clients get the first problems and a count of the rest.
MAX_INVALID_PARAMS = 50
MAX_REASON_CHARS = 300
_DETAIL_PARAMS = 3


def validation_error(params: list[InvalidParam], detail: str | None = None) -> ApiError:
    shown = [_shortened(param) for param in params[:MAX_INVALID_PARAMS]]
    hidden = len(params) - len(shown)
    if detail is None:
        detail = "; ".join(f"{param.name}: {param.reason}" for param in shown[:_DETAIL_PARAMS])
        more = len(params) - min(len(shown), _DETAIL_PARAMS)
        if more:
            detail += f"; and {more} more invalid parameter(s)"
    if hidden:
        shown.append(InvalidParam(
            "nonFieldErrors", "too_many_errors",
            f"{hidden} more invalid parameter(s) not listed; at most {MAX_INVALID_PARAMS} are",
        ))
    return ApiError(400, "invalid", "Invalid input.", detail, shown)


def _shortened(param: InvalidParam) -> InvalidParam:
    if len(param.reason) <= MAX_REASON_CHARS and len(param.name) <= MAX_REASON_CHARS:
        return param
    return InvalidParam(_cut(param.name), param.code, _cut(param.reason))


def _cut(text: str) -> str:
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def invalid(name: str, code: str, reason: str) -> ApiError:
    return validation_error([InvalidParam(name, code, reason)])


def not_found(detail: str = "No resource at this address.") -> ApiError:
    return ApiError(404, "not_found", "Not found.", detail)


def forbidden(code: str, detail: str) -> ApiError:
    title = (
        "Authentication failed." if code == "not_authenticated" else "Permission denied."
    )
    return ApiError(403, code, title, detail)


def method_not_allowed(method: str, allowed: list[str]) -> ApiError:
    return ApiError(
        405,
        "method_not_allowed",
        "Method not allowed.",
        f"{method} is not allowed here; allowed: {', '.join(allowed)}",
        headers={"Allow": ", ".join(allowed)},
    )


def unavailable(detail: str) -> ApiError:
    return ApiError(503, "service_unavailable", "Service unavailable.", detail,
                    headers={"Retry-After": "5"})


def server_error() -> ApiError:
    return ApiError(
        500,
        "error",
        "Internal server error.",
        "The server could not handle the request; the log has the details.",
    )

"""Errors the server answers with, in the OpenAI error shape."""

from __future__ import annotations


class RequestError(Exception):
    """A request the server refuses; becomes an HTTP response with an OpenAI-style body.

    Args:
        message (`str`): what is wrong, naming the offending part of the request.
        param (`str`, *optional*): the request field at fault (e.g. `"messages[0].content[1].image_url"`).
        status_code (`int`, *optional*, defaults to 400): the HTTP status.
        error_type (`str`, *optional*, defaults to `"invalid_request_error"`): the OpenAI error type.
    """

    def __init__(
        self,
        message: str,
        param: str | None = None,
        status_code: int = 400,
        error_type: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.message = message
        self.param = param
        self.status_code = status_code
        self.error_type = error_type

    def body(self) -> dict:
        """The JSON body: `{"error": {"message", "type", "param", "code"}}`."""
        return error_body(self.message, self.error_type, self.param, self.status_code)


def error_body(message: str, error_type: str, param: str | None = None, code: int | str | None = None) -> dict:
    """An OpenAI-style error body."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}

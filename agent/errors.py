"""Errors the service raises and the HTTP edge turns into answers (status and type per class)."""

from __future__ import annotations


class ServiceError(Exception):
    status = 400
    type = "invalid_request"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class InvalidRequestError(ServiceError):
    status = 422
    type = "invalid_request"


class PayloadTooLargeError(ServiceError):
    status = 413
    type = "payload_too_large"


class QueueFullError(ServiceError):
    status = 429
    type = "overloaded"

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the work queue is full; retry in {retry_after}s")
        self.retry_after = retry_after


class NotReadyError(ServiceError):
    status = 503
    type = "unavailable"

"""Python client for the COCONUT latent-reasoning inference server.

HTTP only (httpx + pydantic); it knows nothing of torch or of the server's internals.

    from coconut_client import CoconutClient, AsyncCoconutClient, APIStatusError

    with CoconutClient(base_url="http://127.0.0.1:8000") as c:
        r = c.reason("Is Tom a wumpus or a yumpus?", max_tokens=32, temperature=0,
                     latent={"mode": "fixed", "thoughts": 6})
        print(r.answer, r.finish_reason, r.usage.latent_thoughts)
        for ev in c.stream("Is Tom a wumpus or a yumpus?", max_tokens=32):
            print(ev.delta, end="")

See ``clients/python/README.md`` for retries, timeouts, errors and streaming rules.
"""

from ._async_client import AsyncCoconutClient
from ._base import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, NOT_GIVEN, make_timeout
from ._client import CoconutClient
from ._errors import (APIConnectionError, APIError, APIResponseValidationError, APIStatusError,
                      APIStreamError, APITimeoutError, AuthenticationError, BadRequestError,
                      CoconutError, IncompleteStreamError, InternalServerError, NotFoundError,
                      OverloadedError, PermissionDeniedError, RateLimitError,
                      ServiceUnavailableError, UnprocessableEntityError)
from ._retry import RetryPolicy
from ._streaming import AsyncStream, Stream
from ._types import (Health, Latent, LatentThought, Majority, Mixture, Model, ModelList, PromptTokensDetails,
                     ReasonResult, Sample, StreamEvent, Timings, TraceToken, Usage)
from ._version import __version__

__all__ = [
    "CoconutClient", "AsyncCoconutClient", "RetryPolicy", "Stream", "AsyncStream",
    "DEFAULT_MAX_RETRIES", "DEFAULT_TIMEOUT", "NOT_GIVEN", "make_timeout",
    "Latent", "Mixture", "ReasonResult", "Sample", "Majority", "StreamEvent", "Usage", "PromptTokensDetails", "Timings", "LatentThought", "TraceToken",
    "Model",
    "ModelList", "Health",
    "CoconutError", "APIError", "APIStatusError", "BadRequestError", "UnprocessableEntityError",
    "AuthenticationError", "PermissionDeniedError", "NotFoundError", "RateLimitError",
    "InternalServerError", "OverloadedError", "ServiceUnavailableError", "APIConnectionError",
    "APITimeoutError", "APIResponseValidationError", "APIStreamError", "IncompleteStreamError",
    "__version__",
]

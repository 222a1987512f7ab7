"""A validated request's sampling and token budget: the request's values, else `runtime`'s defaults,
within the context the plan's KV cache holds per sequence (OpenAI's 400s when they do not fit)."""

from __future__ import annotations

from glmdeploy.config.settings import Runtime
from glmdeploy.serving.backend import Sampling
from glmdeploy.serving.protocol import ApiError, ChatCompletionRequest, CompletionRequest


def resolve_sampling(
    request: ChatCompletionRequest | CompletionRequest,
    prompt_tokens: int,
    *,
    runtime: Runtime,
    context_tokens: int,
) -> Sampling:
    """The sampling of one request whose prompt has `prompt_tokens` tokens.

    A request without max_tokens gets `runtime.max_new_tokens`, cut to what the context leaves;
    one that asks for more than `runtime.max_tokens_per_request`, or for more than the context
    leaves, is refused (as OpenAI refuses it) rather than silently shortened.

    Raises:
        ApiError: 400 `context_length_exceeded` or `invalid_value` (an empty prompt, a cap).
    """
    where = "messages" if isinstance(request, ChatCompletionRequest) else "prompt"
    if prompt_tokens < 1:  # generate needs at least one token to start from (vLLM refuses too)
        message = f"the {where} is empty: it encodes to 0 tokens (this tokenizer adds none)"
        raise ApiError(400, message, param=where, code="invalid_value")
    room = context_tokens - prompt_tokens
    if room < 1:
        message = (f"This model's maximum context length is {context_tokens} tokens. However, "
                   f"your {where} resulted in {prompt_tokens} tokens, which leaves no room for "
                   "a completion. Please reduce the length of the " + where + ".")  # fmt: skip
        raise ApiError(400, message, param=where, code="context_length_exceeded")
    param, asked = request.requested_tokens()
    cap = runtime.max_tokens_per_request
    if asked is not None and cap is not None and asked > cap:
        message = f"{param}={asked} is more than this server allows per request ({cap})"
        raise ApiError(400, message, param=param, code="invalid_value")
    if asked is not None and asked > room:
        message = (f"This model's maximum context length is {context_tokens} tokens. However, "
                   f"you requested {prompt_tokens + asked} tokens ({prompt_tokens} in the "
                   f"{where}, {asked} in the completion). Please reduce the length of the "
                   f"{where} or completion.")  # fmt: skip
        raise ApiError(400, message, param=param, code="context_length_exceeded")
    default = min(runtime.max_new_tokens, cap or runtime.max_new_tokens, room)
    return Sampling(
        max_new_tokens=asked if asked is not None else default,
        temperature=runtime.temperature if request.temperature is None else request.temperature,
        top_p=runtime.top_p if request.top_p is None else request.top_p,
        seed=request.seed,
        stop=request.stop_strings(),
    )

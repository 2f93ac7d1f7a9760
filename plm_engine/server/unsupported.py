"""Request fields that would change the output but that this server does not implement (yet).

A request that sets one of them to anything but its no-op value gets a 400 naming the field, never
silent disregard: a client asking for JSON output or a logit bias must not get unconstrained text
that looks like success. This table is the one place to lift an entry when its feature lands
(structured output, logit_bias, min_tokens and the vLLM extras have landed: generation/structured.py
and the sampler; llama.cpp's top-level json_schema and prompt_logprobs have not).

Fields are looked up among the declared request fields and the unknown ones pydantic keeps
(protocol._Request has extra="allow"), so vLLM's and llama.cpp's extensions are caught by name.
"""

from __future__ import annotations

from plm_engine.server.protocol import APIError


def _unset(value) -> bool:
    return value is None


def _false(value) -> bool:
    return value is None or value is False


def _empty(value) -> bool:
    return value is None or value == [] or value == {} or value == ""


def _true(value) -> bool:
    return value is None or value is True


def _zero(value) -> bool:
    return value is None or value == 0


def _text_format(value) -> bool:
    return value is None or (isinstance(value, dict) and value.get("type", "text") == "text")


# field -> (is it a no-op?, why it is refused). Shared by /v1/completions and /v1/chat/completions.
COMMON: dict[str, tuple] = {
    "json_schema": (_unset, "json_schema-constrained sampling is not supported yet"),
    "prompt_logprobs": (_unset, "prompt_logprobs is not supported yet (echo with logprobs is)"),
    "length_penalty": (lambda v: v is None or v == 1, "length_penalty (beam search) is not supported"),
    "guided_whitespace_pattern": (_unset, "guided_whitespace_pattern is not supported"),
    "use_beam_search": (_false, "beam search is not supported"),
    "bad_words": (_empty, "bad_words is not supported yet"),
    "allowed_token_ids": (_empty, "allowed_token_ids is not supported yet"),
    "logits_processors": (_empty, "logits_processors are not supported"),
    "typical_p": (lambda v: v is None or v == 1, "typical_p is not supported"),
    "mirostat": (_zero, "mirostat sampling is not supported"),
}

COMPLETIONS: dict[str, tuple] = {
    **COMMON,
    "suffix": (_empty, "suffix is not supported"),
}

CHAT: dict[str, tuple] = {
    **COMMON,
    "tools": (_empty, "tools are not supported"),
    "functions": (_empty, "functions are not supported"),
    "echo": (_false, "echo is not supported for chat completions"),
    "continue_final_message": (_false, "continue_final_message is not supported yet"),
    "add_generation_prompt": (_true, "add_generation_prompt=false is not supported yet"),
    "chat_template": (_unset, "a request-supplied chat_template is not accepted"),
    "chat_template_kwargs": (_empty, "chat_template_kwargs are not supported"),
    "documents": (_empty, "documents are not supported"),
}


def reject_unsupported(req, table: dict[str, tuple]) -> None:
    """Raises a 400 APIError for the first field of `table` that `req` sets to a value that would matter."""
    extra = req.model_extra or {}
    for name, (is_noop, why) in table.items():
        value = getattr(req, name) if name in type(req).model_fields else extra.get(name)
        if not is_noop(value):
            raise APIError(400, f"{why}; remove '{name}' from the request", param=name, code="unsupported_field")

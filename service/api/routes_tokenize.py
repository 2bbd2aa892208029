"""vLLM's tokenizer routes: `POST /tokenize` (a prompt or chat messages -> token ids) and `POST /detokenize`.

The same tokenization as generation (the model's tokenizer, BOS as its config says, the chat template
for messages), so a client can count tokens or check a prompt against `max_model_len` first.
"""

from __future__ import annotations

from fastapi import APIRouter

from service.api import chat
from service.api.deps import State, UserAuth
from service.api.generation import api_error, resolve
from service.api.schemas import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from service.engine import EngineError

router = APIRouter(tags=["tokenizer"])
ERRORS = {
    code: {"description": text}
    for code, text in [
        (401, "missing or wrong API key"),
        (404, "unknown model or adapter"),
        (503, "loading or draining; see Retry-After"),
    ]
}


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
async def tokenize(body: TokenizeRequest, state: State, _: UserAuth) -> TokenizeResponse:
    """Token ids of a prompt, or of chat messages rendered with the model's chat template."""
    client, target = resolve(state, body.model)
    info = client.model(target.base)
    try:
        if body.messages is not None:
            text = chat.render(
                body.messages, info.chat_template, info.bos_token, info.eos_token, body.add_generation_prompt
            )
        else:
            text = body.prompt or ""
        client.check_text(text, "prompt")
        ids = await client.tokenize(target, text, body.add_special_tokens)
    except EngineError as exc:
        raise api_error(exc, state) from exc
    return TokenizeResponse(count=len(ids), max_model_len=info.max_model_len, tokens=ids)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
async def detokenize(body: DetokenizeRequest, state: State, _: UserAuth) -> DetokenizeResponse:
    """The text of token ids."""
    client, target = resolve(state, body.model)
    try:
        return DetokenizeResponse(prompt=client.detokenize(target, body.tokens))
    except EngineError as exc:
        raise api_error(exc, state) from exc

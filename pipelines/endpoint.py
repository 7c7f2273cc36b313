"""The check at the end of a pipeline: a chat turn and a blank filling with the final model,
through the deployed endpoint when the pipeline serves it, else in this process."""

from __future__ import annotations

import json
import os

from pipelines import effects
from pipelines.config import PipelineConfig
from stages.serve.config import API_KEY_ENV


def check(p: PipelineConfig, outputs: dict, model_uri: str) -> dict[str, str]:
    """Send the `check` requests; returns {request: answer}."""
    c = p.check
    if "serve" in outputs:
        url = outputs["serve"]["url"]
        print(f"== requests to the endpoint {url}", flush=True)
        chat_body = {"model": p.serve.get("model_name", "glm"), "messages": [{"role": "user", "content": c.chat}],
                     "max_tokens": c.max_tokens, **effects.check_decoding()}
        fill_body = {"text": c.fill, "max_tokens": c.max_tokens, **effects.check_decoding()}
        key = p.serve.get("api_key", "") or os.environ.get(API_KEY_ENV, "")  # as the endpoint resolves it
        answers = {f"chat: {c.chat}": _post(f"{url}/v1/chat/completions", chat_body, key)["choices"][0]["message"]["content"],
                   f"fill: {c.fill}": _post(f"{url}/v1/glm/fill", fill_body, key)["text"]}
    else:
        from glm.checkpoint import load_inference_checkpoint
        from glm.generation import chat, chat_generation_config, fill_blanks

        model, tokenizer = load_inference_checkpoint(model_uri)
        gen = chat_generation_config(c.max_tokens, seed=effects.CHECK_SEED)
        response, _ = chat(model, tokenizer, c.chat, config=gen)
        [filled] = fill_blanks(model, tokenizer, [c.fill], gen)
        answers = {f"chat: {c.chat}": response, f"fill: {c.fill}": filled.text}
    for request, answer in answers.items():
        print(f"  {request!r} -> {answer!r}", flush=True)
    return answers


def _post(url: str, body: dict, api_key: str = "") -> dict:
    import urllib.request

    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.load(response)

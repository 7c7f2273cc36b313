"""python -m stages.serve.chat [--url http://127.0.0.1:8000] [--api-key KEY] [--temperature T] ...

A terminal chat with a running GLM endpoint: answers stream as they are generated and the
conversation is kept (sent as history each turn, rendered server-side in the model's chat
format: a system prompt is a system role in the `roles` format, and opens the first question
in ChatGLM-6B's). Commands: /system TEXT sets the system prompt (empty: none) and starts a new
conversation, /reset starts a new conversation, /exit (or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stages.serve.chat", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL (default %(default)s)")
    parser.add_argument("--api-key", default=os.environ.get("GLM_SERVE_API_KEY", "none"),
                        help="Bearer key if the server needs one (default: $GLM_SERVE_API_KEY)")
    parser.add_argument("--model", help="model id (default: the one the server lists)")
    parser.add_argument("--temperature", type=float, help="0 = greedy (default: the server's, 0.95)")
    parser.add_argument("--top-p", type=float, help="nucleus sampling (default: the server's, 0.7)")
    parser.add_argument("--max-tokens", type=int, default=256, help="longest answer (default %(default)s)")
    parser.add_argument("--system", help="a system prompt (sent first in every turn; /system changes it)")
    args = parser.parse_args(argv)

    import openai

    client = openai.OpenAI(base_url=args.url.rstrip("/") + "/v1", api_key=args.api_key, max_retries=0)
    try:
        model = args.model or client.models.list().data[0].id
    except openai.APIError as e:
        print(f"error: cannot reach a GLM server at {args.url}: {e}", file=sys.stderr)
        return 2
    print(f"chatting with '{model}' at {args.url}  (/system TEXT: system prompt, /reset: new conversation, "
          f"/exit: quit)")
    system = args.system or ""
    messages: list[dict] = []
    sampling = {k: v for k, v in (("temperature", args.temperature), ("top_p", args.top_p)) if v is not None}
    while True:
        try:
            query = input("\nyou> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if query in ("/exit", "/quit"):
            return 0
        if query == "/reset" or query == "/system" or query.startswith("/system "):
            if query != "/reset":
                system = query[len("/system"):].strip()
            messages = []
            print(f"(new conversation{', system prompt: ' + repr(system) if system else ''})")
            continue
        if not query:
            continue
        messages.append({"role": "user", "content": query})
        print("glm> ", end="", flush=True)
        answer = []
        try:
            start = [{"role": "system", "content": system}] if system else []
            stream = client.chat.completions.create(model=model, messages=start + messages,
                                                    max_tokens=args.max_tokens, stream=True, **sampling)
            for chunk in stream:
                for choice in chunk.choices:
                    if choice.delta.content:
                        answer.append(choice.delta.content)
                        print(choice.delta.content, end="", flush=True)
            print()
        except KeyboardInterrupt:
            print(" [interrupted]")
        except openai.APIError as e:
            print(f"\nerror: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": "".join(answer)})


if __name__ == "__main__":
    sys.exit(main())

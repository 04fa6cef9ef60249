"""Talk to `fastvlm-server` with the official `openai` package: an image as a base64 data URL,
a streamed answer, a follow-up question, and the server's usage and timings.

    python -m fastvlm_mlx.server --model apple/FastVLM-0.5B          # in another terminal
    python examples/openai_client.py photo.jpg --prompt "What is on the table?"

The follow-up resends the whole conversation, as the API is stateless; the server continues from
the KV cache of the first turn, so the image is not encoded again (vision_ms 0).
"""

import argparse
import base64
import mimetypes
import os
import sys

try:
    from openai import OpenAI
except ImportError:
    sys.exit('error: this example needs the openai client: pip install "fastvlm-mlx[server]"')


def data_url(path: str) -> str:
    mime = mimetypes.guess_type(path)[0] or "image/jpeg"
    with open(path, "rb") as f:
        return f"data:{mime};base64,{base64.b64encode(f.read()).decode()}"


def main():
    p = argparse.ArgumentParser(description="Ask fastvlm-server about an image.")
    p.add_argument("image")
    p.add_argument("--prompt", default="Describe the image.")
    p.add_argument("--follow-up", default="What colours dominate the picture?")
    p.add_argument("--base-url", default="http://127.0.0.1:8080/v1")
    p.add_argument("--api-key", default=os.environ.get("FASTVLM_API_KEY", "none"))
    p.add_argument("--max-tokens", type=int, default=256)
    args = p.parse_args()

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = client.models.list().data[0].id
    messages = [{
        "role": "user",
        "content": [
            {"type": "text", "text": args.prompt},
            {"type": "image_url", "image_url": {"url": data_url(args.image)}},
        ],
    }]

    # 1. Streamed: text as it comes; the last chunk carries usage and timings.
    answer = []
    stream = client.chat.completions.create(model=model, messages=messages, stream=True,
                                            max_tokens=args.max_tokens)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            answer.append(chunk.choices[0].delta.content)
            print(chunk.choices[0].delta.content, end="", flush=True)
        if chunk.choices and chunk.choices[0].finish_reason:
            usage, timings = chunk.usage, chunk.timings  # our extra field, kept by the client
    print(f"\n[{usage.prompt_tokens} prompt tokens ({usage.image_tokens} image), "
          f"{usage.completion_tokens} generated; TTFT {timings['ttft_ms']:.0f} ms, "
          f"vision {timings['vision_ms']:.0f} ms, {timings['decode_tps']:.0f} tokens/s]\n")

    # 2. A follow-up, not streamed: the whole conversation again.
    messages += [{"role": "assistant", "content": "".join(answer)},
                 {"role": "user", "content": args.follow_up}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=args.max_tokens)
    print(r.choices[0].message.content)
    t = r.timings
    print(f"[TTFT {t['ttft_ms']:.0f} ms, vision {t['vision_ms']:.0f} ms, "
          f"{r.usage.prompt_tokens_details.cached_tokens} of {r.usage.prompt_tokens} prompt tokens "
          "from the KV cache]")


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The official openai Python client against a running `eqat serve` (run by tests/apps/serve_http_test.cpp).

usage: openai_client_check.py BASE_URL API_KEY IMAGE QUESTION
Prints "answer: TEXT", "streamed: TEXT" and "models: ID ..."; exits non-zero on any mismatch with the schema.
"""
import base64
import sys

import openai

base_url, key, image, question = sys.argv[1:5]
client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)
url = "data:image/png;base64," + base64.b64encode(open(image, "rb").read()).decode()
messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": question}]}]

models = client.models.list()
print("models:", " ".join(m.id for m in models.data))

r = client.chat.completions.create(model=models.data[0].id, messages=messages, temperature=0, max_tokens=48)
assert r.object == "chat.completion", r
assert r.choices[0].finish_reason in ("stop", "length"), r
assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens, r.usage
print("answer:", r.choices[0].message.content)

parts, usage = [], None
for chunk in client.chat.completions.create(model=models.data[0].id, messages=messages, temperature=0,
                                            max_tokens=48, stream=True, stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
assert usage is not None and usage.completion_tokens == r.usage.completion_tokens, usage
print("streamed:", "".join(parts))

try:
    openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).models.list()
    sys.exit("a wrong key was accepted")
except openai.AuthenticationError as e:
    print("wrong key refused:", e.status_code)

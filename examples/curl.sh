#!/usr/bin/env bash
# Ask fastvlm-server about an image with curl: a base64 data URL, one plain and one streamed call.
#
#   python -m fastvlm_mlx.server --model apple/FastVLM-0.5B     # in another terminal
#   bash examples/curl.sh photo.jpg "What is on the table?"
#
# FASTVLM_URL (default http://127.0.0.1:8080) and FASTVLM_API_KEY (when the server has one).
set -euo pipefail
IMAGE=${1:?usage: curl.sh IMAGE [PROMPT]}
PROMPT=${2:-Describe the image.}
URL=${FASTVLM_URL:-http://127.0.0.1:8080}
IMAGE_B64=$(base64 < "$IMAGE" | tr -d '\n')
PROMPT_JSON=$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$PROMPT")

# The body goes through a file: a photo's base64 is too long for a command line.
BODY=$(mktemp)
trap 'rm -f "$BODY"' EXIT
body() {  # $1: stream (true/false)
  printf '{"model": "fastvlm", "max_tokens": 128, "stream": %s, "messages": [{"role": "user",
    "content": [{"type": "text", "text": %s},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,%s"}}]}]}' \
    "$1" "$PROMPT_JSON" "$IMAGE_B64" > "$BODY"
}

# One JSON answer: choices[0].message.content, usage (with image_tokens) and timings.
body false
curl -sS "$URL/v1/chat/completions" -H "Content-Type: application/json" \
  -H "Authorization: Bearer ${FASTVLM_API_KEY:-none}" --data-binary @"$BODY"
echo

# Streamed as server-sent events (-N prints each `data:` line as it arrives), ending in [DONE].
body true
curl -sS -N "$URL/v1/chat/completions" -H "Content-Type: application/json" \
  -H "Authorization: Bearer ${FASTVLM_API_KEY:-none}" --data-binary @"$BODY"

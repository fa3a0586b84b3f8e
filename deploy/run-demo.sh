#!/usr/bin/env bash
# make run: start sbora-serve on the default model with two demo adapters and
# print curl examples. Falls back to a small generated model when the shared
# stories260K.gguf is absent.
set -euo pipefail
BIN=${BIN:-./bin/sbora-serve}
MODEL=${MODEL:-../shared/models/stories260K.gguf}
DEMO=${DEMO_DIR:-.demo}
PORT=${PORT:-8080}
CTX=${CTX:-512}
mkdir -p "$DEMO/adapters"
if [ ! -f "$MODEL" ]; then
  echo "note: $MODEL not found; using a small generated random-weight model instead"
  MODEL="$DEMO/random-llama.gguf"
  [ -f "$MODEL" ] || "$BIN" model random --out "$MODEL" --layers 4 --embd 256 --heads 4 --vocab 2000 --type Q8_0
fi
[ -f "$DEMO/adapters/demo-fa.gguf" ] || "$BIN" adapters random --base "$MODEL" --variant fa --rank 8 --std 0.02 --seed 1 --name demo-fa --out "$DEMO/adapters/demo-fa.gguf"
[ -f "$DEMO/adapters/demo-fb.gguf" ] || "$BIN" adapters random --base "$MODEL" --variant fb --rank 8 --std 0.01 --seed 2 --name demo-fb --out "$DEMO/adapters/demo-fb.gguf"
# A trained demo: teach the base a "fact" it does not know (two seconds on CPU).
if [ ! -f "$DEMO/adapters/moon.gguf" ]; then
  for n in Lily Tom Ben Sue Max Anna Sam Mia Tim Lucy Jack Emma; do
    for o in ball cat dog box tree car cake hat; do
      echo "{\"prompt\": \"$n saw a $o. What did $n say?\", \"completion\": \" $n said: The moon is made of green cheese.\"}"
    done
  done > "$DEMO/moon.jsonl"
  "$BIN" train --model "$MODEL" --data "$DEMO/moon.jsonl" --out "$DEMO/adapters/moon.gguf" --name moon \
    --variant fa --rank 8 --lr 1e-2 --steps 40 --batch 8 --eval-split 0.1
fi
NAME=$(basename "$MODEL" .gguf)
URL="http://127.0.0.1:$PORT"
cat <<EXAMPLES

Try (in another shell):
  curl -s $URL/v1/models
  curl -s $URL/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$NAME", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}'
  curl -s $URL/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model": "demo-fa", "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0}'
  curl -s $URL/v1/completions -H 'Content-Type: application/json' \\
    -d '{"model": "moon", "prompt": "Tom saw a bird. What did Tom say?", "max_tokens": 16, "temperature": 0}'
  curl -sN $URL/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "$NAME", "messages": [{"role": "user", "content": "Tell me a story"}], "adapters": [{"name": "demo-fa", "scale": 0.5}, {"name": "demo-fb"}], "max_tokens": 30, "stream": true}'
  curl -s $URL/v1/adapters
  curl -s $URL/metrics | grep ^sbora_

EXAMPLES
exec "$BIN" serve --model "$MODEL" --adapter-dir "$DEMO/adapters" --addr "127.0.0.1:$PORT" --ctx "$CTX"

// Drives sbora-serve with the official openai npm client and prints one JSON
// object with what came back; the Go test checks it.
// usage: node client.mjs BASE_URL MODEL ADAPTER
import OpenAI from "openai";

const [baseURL, model, adapter] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "test-key", maxRetries: 0 });
const out = {};

const models = await client.models.list();
out.models = [];
for await (const m of models) out.models.push({ id: m.id, parent: m.parent ?? null });

const chat = await client.chat.completions.create({
  model: adapter,
  messages: [{ role: "user", content: "Tell me a story." }],
  max_tokens: 24,
  temperature: 0,
});
out.chat = { text: chat.choices[0].message.content, finish: chat.choices[0].finish_reason, usage: chat.usage };

const stream = await client.chat.completions.create({
  model: adapter,
  messages: [{ role: "user", content: "Tell me a story." }],
  max_tokens: 24,
  temperature: 0,
  stream: true,
  stream_options: { include_usage: true },
});
let text = "", chunks = 0, finish = null, usage = null;
for await (const chunk of stream) {
  chunks++;
  if (chunk.usage) usage = chunk.usage;
  const c = chunk.choices[0];
  if (!c) continue;
  if (c.delta?.content) text += c.delta.content;
  if (c.finish_reason) finish = c.finish_reason;
}
out.chatStream = { text, chunks, finish, usage };

const comp = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 16, temperature: 0 });
out.completion = { text: comp.choices[0].text, finish: comp.choices[0].finish_reason, usage: comp.usage };

const compStream = await client.completions.create({ model, prompt: "Once upon a time", max_tokens: 16, temperature: 0, stream: true });
let ctext = "";
for await (const chunk of compStream) ctext += chunk.choices[0]?.text ?? "";
out.completionStream = { text: ctext };

try {
  await client.chat.completions.create({ model: "no-such-model", messages: [{ role: "user", content: "x" }] });
  out.notFound = { status: 200 };
} catch (e) {
  out.notFound = { status: e.status, type: e.error?.type ?? e.type ?? null, code: e.code ?? null };
}
console.log(JSON.stringify(out));

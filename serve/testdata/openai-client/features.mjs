// Drives the newer OpenAI features with the official openai npm client
// against a Llama-3-template model and prints one JSON object with what came
// back; the Go test checks it.
// usage: node features.mjs BASE_URL MODEL TOOLS_JSON
import OpenAI from "openai";

const [baseURL, model, toolsJSON] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "test-key", maxRetries: 0 });
const tools = JSON.parse(toolsJSON);
const messages = [{ role: "user", content: "What is the weather in Paris?" }];
const out = {};

const lp = await client.chat.completions.create({ model, messages, max_tokens: 5, temperature: 0, logprobs: true, top_logprobs: 3 });
out.logprobs = lp.choices[0].logprobs.content.map((c) => ({ token: c.token, logprob: c.logprob, top: c.top_logprobs.length, bytes: c.bytes.length }));
out.logprobsText = lp.choices[0].message.content;

const n = await client.chat.completions.create({ model, messages, max_tokens: 6, temperature: 1, seed: 5, n: 3 });
out.n = n.choices.map((c) => ({ index: c.index, text: c.message.content }));
out.nUsage = n.usage;

const schema = { type: "object", properties: { city: { type: "string", maxLength: 10 }, days: { type: "integer", minimum: 1, maximum: 7 } },
  required: ["city", "days"], additionalProperties: false };
const rf = await client.chat.completions.create({ model, messages, max_tokens: 80, temperature: 1, seed: 9,
  response_format: { type: "json_schema", json_schema: { name: "forecast", strict: true, schema } } });
out.json = { text: rf.choices[0].message.content, finish: rf.choices[0].finish_reason };

const tc = await client.chat.completions.create({ model, messages, tools, tool_choice: "required", max_tokens: 120, temperature: 0 });
out.tools = { finish: tc.choices[0].finish_reason, calls: tc.choices[0].message.tool_calls };

// Streaming: the SDK's helper assembles tool-call deltas.
const stream = client.chat.completions.stream({ model, messages, tools, tool_choice: { type: "function", function: { name: "add" } },
  max_tokens: 120, temperature: 0 });
const final = await stream.finalChatCompletion();
out.streamTools = { finish: final.choices[0].finish_reason, calls: final.choices[0].message.tool_calls };

try {
  await client.chat.completions.create({ model, messages, logprobs: true, top_logprobs: 25 });
  out.bad = { status: 200 };
} catch (e) {
  out.bad = { status: e.status, param: e.param ?? e.error?.param ?? null };
}
console.log(JSON.stringify(out));

// Cross-language client check: @grpc/grpc-js + @grpc/proto-loader call a running specserve server.
//
//   [SPECSERVE_TOKEN=...] node client.js HOST:PORT
//
// Loads proto/specserve/v1/specserve.proto (no generated code), then calls ModelService.Fit,
// GenerationService.Generate and GenerateStream (also with logprobs, prompt_logprobs and n = 2), structured output
// (response_format), and error paths; exits 0 when every check
// passes and prints one JSON line of what it saw. With $SPECSERVE_TOKEN (a server started with
// --auth-token-file) every call sends "authorization: Bearer <token>", and one call without it
// must be UNAUTHENTICATED. tests/test_service_crosslang.py runs it.
"use strict";

const assert = require("node:assert/strict");
const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = path.resolve(__dirname, "..", "..", "proto");

function loadApi() {
  const def = protoLoader.loadSync("specserve/v1/specserve.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the .proto (snake_case)
    longs: String, // uint64 byte counts as decimal strings: no precision loss
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(def).specserve.v1;
}

const TOKEN = process.env.SPECSERVE_TOKEN || "";

function metadata(token = TOKEN) {
  const md = new grpc.Metadata();
  if (token) md.set("authorization", `Bearer ${token}`);
  return md;
}

function call(client, method, request, timeoutMs = 60000, md = metadata()) {
  const deadline = new Date(Date.now() + timeoutMs);
  return new Promise((resolve, reject) => {
    client[method](request, md, { deadline }, (err, resp) => (err ? reject(err) : resolve(resp)));
  });
}

function stream(client, request, timeoutMs = 60000) {
  const deadline = new Date(Date.now() + timeoutMs);
  return new Promise((resolve, reject) => {
    const messages = [];
    const s = client.GenerateStream(request, metadata(), { deadline });
    s.on("data", (m) => messages.push(m));
    s.on("error", reject);
    s.on("end", () => resolve(messages));
  });
}

async function main() {
  const address = process.argv[2] || process.env.SPECSERVE_ADDRESS || "127.0.0.1:50051";
  const api = loadApi();
  const creds = grpc.credentials.createInsecure();
  const models = new api.ModelService(address, creds);
  const gen = new api.GenerationService(address, creds);

  // Fit: an empty target_path plans the server's default model.
  const fit = await call(models, "Fit", { pair: { name: "node-fit", params: { n_ctx: 256, n_parallel: 2 } } });
  assert.equal(fit.fits, true, "the default model fits");
  assert.ok(fit.plan.buffers.length > 0, "the plan lists buffers");
  const sum = fit.plan.buffers.reduce((acc, b) => acc + BigInt(b.bytes), 0n);
  assert.equal(sum.toString(), fit.plan.total_bytes, "total_bytes is the sum of the buffers");
  for (const b of fit.plan.buffers) {
    assert.ok(["target", "draft"].includes(b.owner), `owner ${b.owner}`);
    assert.ok(["weights", "kv_cache", "outputs", "compute", "prompt_cache", "ngram_cache"].includes(b.kind),
              `kind ${b.kind}`);
  }
  assert.equal(fit.plan.target.n_ctx, 256);
  assert.equal(fit.plan.target.n_parallel, 2);

  // Generate (unary), greedy.
  const request = { prompt: "the cat", max_tokens: 12, sampling: { temperature: 0 } };
  const resp = await call(gen, "Generate", request);
  assert.ok(resp.finish_reason !== "FINISH_REASON_UNSPECIFIED", "finish_reason is set");
  assert.equal(resp.tokens.length, resp.usage.completion_tokens);
  assert.ok(resp.usage.prompt_tokens > 0);
  assert.ok(resp.usage.completion_tokens > 0 && resp.usage.completion_tokens <= 12);

  // GenerateStream: deltas, then one final message with the summary; same greedy output.
  const messages = await stream(gen, request);
  const last = messages[messages.length - 1];
  assert.ok(last.finish_reason !== "FINISH_REASON_UNSPECIFIED", "the final message carries finish_reason");
  for (const m of messages.slice(0, -1)) assert.equal(m.finish_reason, "FINISH_REASON_UNSPECIFIED");
  assert.equal(messages.map((m) => m.text).join(""), resp.text, "stream text == unary text (greedy)");
  assert.deepEqual(messages.flatMap((m) => m.tokens), resp.tokens, "stream tokens == unary tokens (greedy)");
  assert.equal(last.usage.completion_tokens, resp.usage.completion_tokens);

  // Generation controls: logprobs with alternatives, prompt scoring, n completions.
  const controls = { prompt: "the cat", max_tokens: 6, logprobs: true, top_logprobs: 3, prompt_logprobs: 1, n: 2,
    sampling: { temperature: 0.9, seed: 11 } };
  const multi = await call(gen, "Generate", controls);
  assert.deepEqual(multi.choices.map((c) => c.index), [0, 1], "choices 0 and 1");
  assert.deepEqual(multi.tokens, multi.choices[0].tokens, "the top level repeats choice 0");
  for (const c of multi.choices) {
    assert.equal(c.logprobs.length, c.tokens.length, "a logprob per token");
    for (const [i, e] of c.logprobs.entries()) {
      assert.equal(e.token, c.tokens[i]);
      assert.equal(e.top.length, 3, "3 alternatives");
      assert.ok(e.logprob <= 0 && e.top[0].logprob >= e.logprob, "the alternatives start with the most likely");
      assert.ok(Buffer.isBuffer(e.bytes) && e.bytes.length > 0, "the token's bytes");
    }
  }
  assert.equal(multi.prompt_logprobs.length, multi.usage.prompt_tokens, "a prompt logprob per prompt token");
  assert.equal(multi.usage.completion_tokens, multi.choices.reduce((a, c) => a + c.tokens.length, 0));
  const multiStream = await stream(gen, controls);
  const finals = multiStream.filter((m) => m.finish_reason !== "FINISH_REASON_UNSPECIFIED");
  assert.deepEqual(finals.map((m) => m.index).sort(), [0, 1], "each completion ends with its own message");
  for (const c of multi.choices) {
    const mine = multiStream.filter((m) => m.index === c.index);
    assert.deepEqual(mine.flatMap((m) => m.tokens), c.tokens, `stream completion ${c.index} == unary (same seed)`);
  }
  // Structured output: a regex and a JSON Schema (response_format) shape the text; a bad regex is INVALID_ARGUMENT.
  const fmtReq = (response_format) => ({ prompt: "Answer:", max_tokens: 24, sampling: { temperature: 0 }, response_format });
  const re = await call(gen, "Generate", fmtReq({ regex: "(yes|no)![0-9]{2}" }));
  assert.match(re.text, /^(yes|no)![0-9]{2}$/, `regex output ${JSON.stringify(re.text)}`);
  assert.equal(re.finish_reason, "FINISH_REASON_STOP", "a complete format stops the generation");
  const schema = { type: "object", properties: { ok: { type: "boolean" }, kind: { enum: ["a", "b"] } },
    required: ["ok", "kind"], additionalProperties: false };
  const js = await call(gen, "Generate", fmtReq({ json_schema: JSON.stringify(schema) }));
  const obj = JSON.parse(js.text);
  assert.deepEqual(Object.keys(obj).sort(), ["kind", "ok"], `schema output ${js.text}`);
  assert.ok(typeof obj.ok === "boolean" && ["a", "b"].includes(obj.kind), `schema output ${js.text}`);
  await assert.rejects(call(gen, "Generate", fmtReq({ regex: "a(b" })), (err) => {
    assert.equal(err.code, grpc.status.INVALID_ARGUMENT);
    assert.match(err.details, /response_format\.regex/);
    return true;
  });

  // An error path: an unknown pair is NOT_FOUND.
  await assert.rejects(call(gen, "Generate", { pair: "no-such-pair", prompt: "x" }), (err) => {
    assert.equal(err.code, grpc.status.NOT_FOUND);
    return true;
  });

  // With a token: the same call without one is refused.
  if (TOKEN) {
    await assert.rejects(call(gen, "Generate", request, 60000, metadata("")), (err) => {
      assert.equal(err.code, grpc.status.UNAUTHENTICATED);
      return true;
    });
  }

  console.log(JSON.stringify({ ok: true, authenticated: Boolean(TOKEN), fit_buffers: fit.plan.buffers.length, total_bytes: fit.plan.total_bytes,
    text: resp.text, completion_tokens: resp.usage.completion_tokens, stream_messages: messages.length,
    choices: multi.choices.length,
    regex_text: re.text, json_schema_text: js.text }));
  models.close();
  gen.close();
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : err);
  process.exit(1);
});

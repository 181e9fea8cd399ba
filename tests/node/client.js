// Cross-language client check: @grpc/grpc-js + @grpc/proto-loader call a running specserve server.
//
//   [SPECSERVE_TOKEN=...] node client.js HOST:PORT
//
// Loads proto/specserve/v1/specserve.proto (no generated code), then calls ModelService.Fit,
// GenerationService.Generate and GenerateStream, and one error path; exits 0 when every check
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
    text: resp.text, completion_tokens: resp.usage.completion_tokens, stream_messages: messages.length }));
  models.close();
  gen.close();
}

main().catch((err) => {
  console.error(err && err.stack ? err.stack : err);
  process.exit(1);
});

// Strict-client check: the Vercel AI SDK (`ai` + `@ai-sdk/openai-compatible`, what OpenCode
// uses) streams one chat answer from a live trioserve. The SDK validates every SSE `data:`
// payload against its chunk schema, so a malformed chunk (or a progress event that is not a
// valid chunk) surfaces as an error part. Any error part or thrown error fails the check.
//
// usage: node aisdk_check.mjs --base-url http://127.0.0.1:PORT/v1 --model ID [--progress]
//                             [--prompt TEXT] [--max-tokens N]
// Prints one JSON line: {ok, id, text, finishReason, usage, chunks, progressChunks, errors}.
// Exit code 0 only when ok.

import { parseArgs } from "node:util";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";
import { streamText } from "ai";

const { values: args } = parseArgs({
  options: {
    "base-url": { type: "string" },
    model: { type: "string", default: "SmolLM2-135M-Instruct" },
    prompt: { type: "string", default: "What is the capital of France?" },
    "max-tokens": { type: "string", default: "24" },
    progress: { type: "boolean", default: false },
  },
});
if (!args["base-url"]) {
  console.error("aisdk_check: --base-url is required");
  process.exit(2);
}

const headers = args.progress ? { "X-SwiftLM-Prefill-Progress": "true" } : undefined;
const provider = createOpenAICompatible({
  name: "trioserve",
  baseURL: args["base-url"],
  apiKey: "unused",
  headers,
  includeUsage: true,
});

const report = {
  ok: false,
  id: null,
  text: "",
  finishReason: null,
  usage: null,
  chunks: 0,
  progressChunks: 0,
  errors: [],
};
const describe = (error) => (error instanceof Error ? error.stack || error.message : JSON.stringify(error));

try {
  const result = streamText({
    model: provider.chatModel(args.model),
    prompt: args.prompt,
    maxOutputTokens: Number(args["max-tokens"]),
    temperature: 0,
    maxRetries: 0,
    includeRawChunks: true,
    abortSignal: AbortSignal.timeout(240_000),
    // Errors are reported as parts below; the default handler would only log them.
    onError: () => {},
  });
  for await (const part of result.fullStream) {
    if (part.type === "raw") {
      report.chunks += 1;
      const raw = part.rawValue;
      if (raw && Array.isArray(raw.choices) && raw.choices.length === 0 && "n_prompt_tokens" in raw) {
        report.progressChunks += 1;
      }
    } else if (part.type === "text-delta") {
      report.text += part.text;
    } else if (part.type === "error") {
      report.errors.push(describe(part.error));
    } else if (part.type === "finish") {
      report.finishReason = part.finishReason;
      report.usage = part.totalUsage;
    }
  }
  report.id = (await result.response).id;
} catch (error) {
  report.errors.push(describe(error));
}

report.ok = report.errors.length === 0 && report.finishReason !== null && report.finishReason !== "error";
console.log(JSON.stringify(report));
process.exit(report.ok ? 0 : 1);

// A text/event-stream parser over a fetch body. EventSource cannot POST, so the playground
// reads the stream itself: events are split on blank lines (LF or CRLF), comment lines
// (": keepalive") are dropped, multi-line data is joined with "\n", as the SSE spec says.

/** Yield {event, data} for each event of a text/event-stream body; comment lines are skipped. */
export async function* sseEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let boundary;
      while ((boundary = buffer.search(/\r?\n\r?\n/)) !== -1) {
        const block = buffer.slice(0, boundary);
        buffer = buffer.slice(boundary).replace(/^\r?\n\r?\n/, "");
        const parsed = parseBlock(block);
        if (parsed) yield parsed;
      }
    }
    // An event not closed by a blank line when the body ends is dropped, as the spec says.
  } finally {
    // Left early (an error event, or the page stops reading): let go of the connection.
    reader.cancel().catch(() => {});
  }
}

export function parseBlock(block) {
  let event = "message";
  const data = [];
  for (const line of block.split(/\r?\n/)) {
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { event, data: data.join("\n") } : null;
}

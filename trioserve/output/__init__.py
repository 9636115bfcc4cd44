"""Sans-IO output: engine events to a wire dialect's payloads, for streamed and whole answers.

No sockets, no awaits: the assembler, chunk builders and the content/reasoning/tool-call
shaping are plain objects, tested with plain event lists. ``streaming/`` does the I/O.
"""

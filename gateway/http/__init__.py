"""The HTTP face: the two hot endpoints as plain ASGI (``endpoints``), middleware (auth, body limit,
request ids, security headers), OpenAI request shapes validated at the edge (``protocol``), SSE responses,
the error handlers and OpenAPI (``api``), and ``routes/``: one module per admin surface. Routes parse, call
one service of another room, and shape the answer; the logic lives in that room."""

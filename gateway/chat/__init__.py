"""The chat path: ``stages`` (one ordered list of named stages over one ``Exchange``), the exchange and
its seams (``exchange``), the answer on its way out (``relay``), what every model call shares (``calls``),
the answers the gateway makes itself (``answers``) and the completion service the endpoints call
(``service``, chat and embeddings)."""
